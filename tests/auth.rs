//! Passwords and ACLs over real sockets: CONNACK codes for bad credentials and anonymous
//! clients in both versions, a password file written by Debian's `mosquitto_passwd`, the
//! `tether passwd` round trip, and ACL decisions on SUBSCRIBE, PUBLISH, delivery and the will.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use tether::config::Config;
use tether::wire::packet::{Connect, Packet, ProtocolVersion, QoS, ReasonCode};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-auth-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

fn tether_passwd(file: &Path, args: &[&str]) {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("passwd")
        .args(["-I", "1000"])
        .arg(file)
        .args(args)
        .status()
        .expect("run tether passwd");
    assert!(status.success(), "tether passwd {args:?}");
}

fn connect(
    version: ProtocolVersion,
    id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> Connect {
    let mut c = v5_connect(id, true);
    c.protocol = version;
    c.username = user.map(str::to_string);
    c.password = password.map(|p| Bytes::copy_from_slice(p.as_bytes()));
    c
}

async fn connack(b: &TestBroker, c: Connect) -> (Raw, ReasonCode) {
    let mut raw = b.raw().await;
    raw.version = c.protocol;
    raw.send_packet(&Packet::Connect(Box::new(c))).await;
    let ack = raw.recv_connack().await;
    (raw, ack.reason)
}

async fn broker_with(password_file: Option<PathBuf>, acl: Option<&str>, dir: &Path) -> TestBroker {
    broker_config(password_file, acl, dir, |_| {}).await
}

async fn broker_config(
    password_file: Option<PathBuf>,
    acl: Option<&str>,
    dir: &Path,
    adjust: impl FnOnce(&mut Config),
) -> TestBroker {
    let mut config = Config::default();
    config.persistence.enabled = false;
    config.auth.password_file = password_file;
    if let Some(text) = acl {
        let path = dir.join("acl");
        std::fs::write(&path, text).expect("acl");
        config.auth.acl_file = Some(path);
    }
    adjust(&mut config);
    TestBroker::with_config(config).await
}

/// A password file with alice and admin (password = `pw-` + name), for the ACL tests: only
/// a checked username selects a user's rules.
fn acl_users(dir: &Path) -> PathBuf {
    let file = dir.join("passwd");
    tether_passwd(&file, &["alice", "pw-alice"]);
    tether_passwd(&file, &["admin", "pw-admin"]);
    tether_passwd(&file, &["bob", "pw-bob"]);
    file
}

#[tokio::test]
async fn bad_credentials_and_anonymous_clients_get_the_connack_codes() {
    let dir = temp("codes");
    let file = dir.join("passwd");
    tether_passwd(&file, &["alice", "wonderland"]);
    let mut config = Config::default();
    config.persistence.enabled = false;
    config.auth.password_file = Some(file);
    config.listener.allow_anonymous = Some(false);
    let b = TestBroker::with_config(config).await;

    use ProtocolVersion::{V311, V5};
    // 3.1.1 CONNACK return codes 4 and 5 (section 3.2.2.3); v5 0x86 and 0x87 (3.2.2.2). The
    // codec writes the 3.1.1 code for the same reason.
    for (version, bad, denied) in [
        (
            V311,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            ReasonCode::NOT_AUTHORIZED,
        ),
        (
            V5,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            ReasonCode::NOT_AUTHORIZED,
        ),
    ] {
        let (_, r) = connack(&b, connect(version, "a", Some("alice"), Some("wonderland"))).await;
        assert_eq!(r, ReasonCode::SUCCESS, "{version:?} good password");
        let (mut c, r) = connack(&b, connect(version, "b", Some("alice"), Some("wrong"))).await;
        assert_eq!(r, bad, "{version:?} wrong password");
        c.expect_closed().await;
        let (_, r) = connack(&b, connect(version, "c", Some("mallory"), Some("x"))).await;
        assert_eq!(r, bad, "{version:?} unknown user");
        let (_, r) = connack(&b, connect(version, "d", Some("alice"), None)).await;
        assert_eq!(r, bad, "{version:?} no password");
        let (mut c, r) = connack(&b, connect(version, "e", None, None)).await;
        assert_eq!(r, denied, "{version:?} anonymous");
        c.expect_closed().await;
    }
    // The exact 3.1.1 bytes: return code 4, then 5.
    let mut c = b.raw().await;
    let mut out = bytes::BytesMut::new();
    tether::wire::codec::encode(
        &Packet::Connect(Box::new(connect(V311, "x", Some("alice"), Some("no")))),
        V311,
        None,
        &mut out,
    )
    .expect("encode");
    c.send(&out).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x04]).await;
    let mut c = b.raw().await;
    c.send(&connect_v311("anon", true, 60)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x05]).await;

    let stats = &b.broker.stats;
    assert_eq!(stats.auth_bad_credentials.load(Ordering::Relaxed), 7);
    assert_eq!(stats.auth_not_authorized.load(Ordering::Relaxed), 3);
    let metrics = tether::ops::admin::prometheus(&tether::ops::admin::figures(&b.broker).await);
    for line in [
        "tether_auth_refused_total{reason=\"bad_credentials\"} 7\n",
        "tether_auth_refused_total{reason=\"not_authorized\"} 3\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    b.stop().await;
}

#[tokio::test]
async fn anonymous_clients_are_refused_by_default_off_loopback() {
    // A listener configured for 0.0.0.0 (bound here to loopback by the harness) keeps
    // the default of a non-loopback address: no anonymous clients.
    let mut config = Config::default();
    config.persistence.enabled = false;
    config.listener.bind = "0.0.0.0:1883".into();
    let b = TestBroker::with_listeners(config).await;
    let mut c = b.raw().await;
    c.send(&connect_v311("anon", true, 60)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x05]).await;
    b.stop().await;

    let mut config = Config::default();
    config.persistence.enabled = false;
    config.listener.bind = "0.0.0.0:1883".into();
    config.listener.allow_anonymous = Some(true);
    let b = TestBroker::with_listeners(config).await;
    let mut c = b.raw().await;
    c.send(&connect_v311("anon", true, 60)).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00]).await;
    b.stop().await;
}

#[tokio::test]
async fn a_password_file_from_mosquitto_passwd_is_accepted() {
    if !outside::require(
        "a_password_file_from_mosquitto_passwd_is_accepted",
        "mosquitto_passwd",
        "Debian package mosquitto",
    ) {
        return;
    }
    let dir = temp("mosquitto-passwd");
    let file = dir.join("passwd");
    let status = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&file)
        .args(["bob", "builder"])
        .status()
        .expect("mosquitto_passwd (Debian package mosquitto) must be installed");
    assert!(status.success());
    let text = std::fs::read_to_string(&file).expect("read");
    assert!(text.starts_with("bob:$7$"), "{text}");
    let b = broker_with(Some(file), None, &dir).await;
    let (_, r) = connack(
        &b,
        connect(ProtocolVersion::V311, "b", Some("bob"), Some("builder")),
    )
    .await;
    assert_eq!(r, ReasonCode::SUCCESS);
    let (_, r) = connack(
        &b,
        connect(ProtocolVersion::V5, "b", Some("bob"), Some("Builder")),
    )
    .await;
    assert_eq!(r, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    b.stop().await;
}

#[tokio::test]
async fn tether_passwd_add_change_delete_round_trip_with_reload() {
    let dir = temp("round-trip");
    let file = dir.join("passwd");
    tether_passwd(&file, &["carol", "first"]);
    let b = broker_with(Some(file.clone()), None, &dir).await;
    let login = |p: &'static str| connect(ProtocolVersion::V5, "carol", Some("carol"), Some(p));
    assert_eq!(connack(&b, login("first")).await.1, ReasonCode::SUCCESS);

    tether_passwd(&file, &["carol", "second"]);
    // Until SIGHUP the running broker keeps the file it read.
    assert_eq!(connack(&b, login("first")).await.1, ReasonCode::SUCCESS);
    b.broker.reload_files(&b.broker.config.auth);
    assert_eq!(
        connack(&b, login("first")).await.1,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD
    );
    assert_eq!(connack(&b, login("second")).await.1, ReasonCode::SUCCESS);

    tether_passwd(&file, &["-D", "carol"]);
    b.broker.reload_files(&b.broker.config.auth);
    assert_eq!(
        connack(&b, login("second")).await.1,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD
    );
    // The file Mosquitto's own tool checks the same way.
    assert!(!std::fs::read_to_string(&file)
        .expect("read")
        .contains("carol"));
    b.stop().await;
}

const ACL: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite home/#
topic deny home/secret
topic write alarms/alice

user admin
topic write #

user bob
topic readwrite home/#

pattern readwrite clients/%c/#
pattern read users/%u/inbox
";

async fn login(b: &TestBroker, version: ProtocolVersion, id: &str, user: Option<&str>) -> Raw {
    let password = user.map(|u| format!("pw-{u}"));
    let (c, r) = connack(b, connect(version, id, user, password.as_deref())).await;
    assert_eq!(r, ReasonCode::SUCCESS, "{id}");
    c
}

#[tokio::test]
async fn acl_refuses_one_filter_of_a_subscribe_and_grants_the_others() {
    let dir = temp("acl-sub");
    let b = broker_with(Some(acl_users(&dir)), Some(ACL), &dir).await;
    // 3.1.1: 0x80 Failure for the refused filter [MQTT-3.9.3-2 return codes], others granted.
    let mut c = login(&b, ProtocolVersion::V311, "c311", Some("alice")).await;
    let mut body = vec![0x00, 0x01];
    for (f, q) in [
        ("home/#", 1u8),
        ("home/secret", 1),
        ("public/news", 0),
        ("users/alice/inbox", 1),
    ] {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
        body.push(q);
    }
    c.send(&frame(0x82, &body)).await;
    // home/secret is denied; public/# is for anonymous clients only; the %u pattern applies.
    c.expect_bytes(&[0x90, 0x06, 0x00, 0x01, 0x01, 0x80, 0x80, 0x01])
        .await;

    // v5: 0x87 Not authorized.
    let mut c = login(&b, ProtocolVersion::V5, "c5", Some("alice")).await;
    let ack = c
        .subscribe_v5(
            1,
            vec![
                v5_filter("home/+/temp", QoS::AtLeastOnce),
                v5_filter("#", QoS::AtLeastOnce),
                v5_filter("clients/c5/#", QoS::AtMostOnce),
                v5_filter("clients/other/#", QoS::AtMostOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        ack.reasons,
        vec![
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::SUCCESS,
            ReasonCode::NOT_AUTHORIZED
        ]
    );
    // Anonymous clients get the rules before the first `user` line.
    let mut anon = login(&b, ProtocolVersion::V5, "anon", None).await;
    let ack = anon
        .subscribe_v5(
            1,
            vec![
                v5_filter("public/#", QoS::AtMostOnce),
                v5_filter("home/#", QoS::AtMostOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        ack.reasons,
        vec![ReasonCode::SUCCESS, ReasonCode::NOT_AUTHORIZED]
    );
    assert_eq!(
        b.broker.stats.acl_denied_subscribe.load(Ordering::Relaxed),
        5
    );
    b.stop().await;
}

#[tokio::test]
async fn acl_refused_publish_is_dropped_with_the_right_acknowledgement() {
    let dir = temp("acl-pub");
    let b = broker_with(Some(acl_users(&dir)), Some(ACL), &dir).await;
    let mut watcher = login(&b, ProtocolVersion::V311, "clients-watch", Some("alice")).await;
    watcher.send(&subscribe(1, "home/#", 1)).await;
    watcher.expect_bytes(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;

    // 3.1.1 has no negative acknowledgement: PUBACK / PUBREC as usual, nothing delivered.
    let mut anon = login(&b, ProtocolVersion::V311, "anon311", None).await;
    anon.send(&publish("home/door", 1, 5, false, false, b"open"))
        .await;
    anon.expect_bytes(&ack(0x40, 5)).await;
    anon.send(&publish("home/door", 2, 6, false, false, b"open"))
        .await;
    anon.expect_bytes(&ack(0x50, 6)).await;
    anon.send(&ack(0x62, 6)).await;
    anon.expect_bytes(&ack(0x70, 6)).await;

    // v5: PUBACK / PUBREC 0x87 (section 3.4.2.1, 3.5.2.1).
    let mut anon5 = login(&b, ProtocolVersion::V5, "anon5", None).await;
    anon5
        .send_packet(&Packet::Publish(v5_publish(
            "home/door",
            QoS::AtLeastOnce,
            1,
            b"x",
        )))
        .await;
    let Packet::PubAck(a) = anon5.recv_packet().await else {
        panic!("expected PUBACK");
    };
    assert_eq!(a.reason, ReasonCode::NOT_AUTHORIZED);
    anon5
        .send_packet(&Packet::Publish(v5_publish(
            "home/door",
            QoS::ExactlyOnce,
            2,
            b"x",
        )))
        .await;
    let Packet::PubRec(a) = anon5.recv_packet().await else {
        panic!("expected PUBREC");
    };
    assert_eq!(a.reason, ReasonCode::NOT_AUTHORIZED);

    // alice may write home/door; the watcher gets only that.
    let mut alice = login(&b, ProtocolVersion::V311, "alice-pub", Some("alice")).await;
    alice
        .send(&publish("home/door", 1, 9, false, false, b"alice"))
        .await;
    alice.expect_bytes(&ack(0x40, 9)).await;
    let Packet::Publish(m) = watcher.recv_packet().await else {
        panic!("expected PUBLISH");
    };
    assert_eq!(&m.payload[..], b"alice");
    assert_eq!(b.broker.stats.acl_denied_publish.load(Ordering::Relaxed), 4);
    let metrics = tether::ops::admin::prometheus(&tether::ops::admin::figures(&b.broker).await);
    assert!(
        metrics.contains("tether_acl_denied_total{action=\"publish\"} 4\n"),
        "{metrics}"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_read_denied_topic_matched_by_a_wildcard_is_not_delivered() {
    let dir = temp("acl-deliver");
    let b = broker_with(Some(acl_users(&dir)), Some(ACL), &dir).await;
    let mut sub = login(&b, ProtocolVersion::V5, "sub", Some("alice")).await;
    sub.sub_v5(1, "home/#", QoS::AtMostOnce).await;
    let mut admin = login(&b, ProtocolVersion::V311, "admin", Some("admin")).await;
    admin
        .send(&publish("home/secret", 0, 0, false, false, b"hidden"))
        .await;
    admin
        .send(&publish("home/hall", 0, 0, false, false, b"visible"))
        .await;
    let m = sub.recv_publish().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("home/hall", &b"visible"[..])
    );
    assert_eq!(
        b.broker.stats.acl_denied_delivery.load(Ordering::Relaxed),
        1
    );

    // After a reload that takes home/# away, the existing subscription delivers nothing.
    let acl = dir.join("acl");
    std::fs::write(
        &acl,
        "user alice\ntopic read other/#\nuser admin\ntopic write #\n",
    )
    .expect("acl");
    b.broker.reload_files(&b.broker.config.auth);
    admin
        .send(&publish("home/hall", 0, 0, false, false, b"after reload"))
        .await;
    sub.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(
        b.broker.stats.acl_denied_delivery.load(Ordering::Relaxed),
        2
    );
    b.stop().await;
}

#[tokio::test]
async fn a_will_the_acl_does_not_allow_refuses_the_connect() {
    let dir = temp("acl-will");
    let b = broker_with(Some(acl_users(&dir)), Some(ACL), &dir).await;
    // 3.1.1: return code 5, not authorized.
    let mut c = b.raw().await;
    c.send(&connect_v311_will(
        "w311",
        true,
        "home/will",
        b"gone",
        0,
        false,
    ))
    .await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x05]).await;
    // v5: 0x87.
    let mut connect = v5_connect("w5", true);
    connect.username = Some("alice".into());
    connect.password = Some(Bytes::from_static(b"pw-alice"));
    connect.will = Some(v5_will("home/will", b"gone", 0));
    let (_, ack) = b.connect_v5(connect.clone()).await;
    // alice may write home/#: accepted.
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    connect.client_id = "w5b".into();
    connect.will = Some(v5_will("public/will", b"gone", 0));
    let (_, ack) = b.connect_v5(connect).await;
    assert_eq!(ack.reason, ReasonCode::NOT_AUTHORIZED);
    b.stop().await;
}

#[tokio::test]
async fn without_a_password_file_a_claimed_username_gets_the_anonymous_rules() {
    let dir = temp("acl-claim");
    let b = broker_with(None, Some(ACL), &dir).await;
    // Nobody checks "admin" here: the client is anonymous to the ACL.
    let (mut c, r) = connack(
        &b,
        connect(
            ProtocolVersion::V5,
            "claims-admin",
            Some("admin"),
            Some("x"),
        ),
    )
    .await;
    assert_eq!(r, ReasonCode::SUCCESS);
    let ack = c
        .subscribe_v5(
            1,
            vec![
                v5_filter("#", QoS::AtMostOnce),
                v5_filter("public/#", QoS::AtMostOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        ack.reasons,
        vec![ReasonCode::NOT_AUTHORIZED, ReasonCode::SUCCESS]
    );
    c.send_packet(&Packet::Publish(v5_publish(
        "home/door",
        QoS::AtLeastOnce,
        3,
        b"x",
    )))
    .await;
    let Packet::PubAck(a) = c.recv_packet().await else {
        panic!("expected PUBACK");
    };
    assert_eq!(a.reason, ReasonCode::NOT_AUTHORIZED);
    b.stop().await;
}

#[tokio::test]
async fn a_denied_retransmission_of_an_unreleased_qos2_message_is_still_acknowledged() {
    let dir = temp("acl-qos2");
    let b = broker_with(Some(acl_users(&dir)), Some(ACL), &dir).await;
    let mut c = login(&b, ProtocolVersion::V5, "q2", Some("alice")).await;
    c.send_packet(&Packet::Publish(v5_publish(
        "home/door",
        QoS::ExactlyOnce,
        4,
        b"x",
    )))
    .await;
    let Packet::PubRec(a) = c.recv_packet().await else {
        panic!("expected PUBREC");
    };
    // Nobody subscribes: a success all the same.
    assert_eq!(a.reason, ReasonCode::NO_MATCHING_SUBSCRIBERS);
    // The rules change before the client, which missed the PUBREC, sends the PUBLISH again.
    std::fs::write(dir.join("acl"), "user alice\ntopic read home/#\n").expect("acl");
    b.broker.reload_files(&b.broker.config.auth);
    let mut again = v5_publish("home/door", QoS::ExactlyOnce, 4, b"x");
    again.dup = true;
    c.send_packet(&Packet::Publish(again)).await;
    let Packet::PubRec(a) = c.recv_packet().await else {
        panic!("expected PUBREC");
    };
    // Already routed once: acknowledged as before [MQTT-4.3.3-10 / 4.3.3-11 in v5].
    assert_eq!(a.reason, ReasonCode::SUCCESS);
    c.send_packet(&Packet::PubRel(tether::wire::packet::Ack::new(4)))
        .await;
    let Packet::PubComp(a) = c.recv_packet().await else {
        panic!("expected PUBCOMP");
    };
    assert_eq!(a.reason, ReasonCode::SUCCESS);
    b.stop().await;
}

#[tokio::test]
async fn messages_a_subscriber_may_not_read_take_no_room_in_its_queue() {
    let dir = temp("acl-queue");
    let b = broker_config(Some(acl_users(&dir)), Some(ACL), &dir, |c| {
        c.session.max_queued_messages = 2;
    })
    .await;
    let (mut alice, r) = connack(&b, {
        let mut c = connect(
            ProtocolVersion::V5,
            "alice-q",
            Some("alice"),
            Some("pw-alice"),
        );
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(600);
        c
    })
    .await;
    assert_eq!(r, ReasonCode::SUCCESS);
    alice.sub_v5(1, "home/#", QoS::AtLeastOnce).await;
    drop(alice);
    b.wait_offline("alice-q").await;

    let mut admin = login(&b, ProtocolVersion::V311, "admin-q", Some("admin")).await;
    for i in 1..=5u16 {
        admin
            .send(&publish("home/secret", 1, i, false, false, b"no"))
            .await;
        admin.expect_bytes(&ack(0x40, i)).await;
    }
    for i in 6..=7u16 {
        admin
            .send(&publish("home/hall", 1, i, false, false, b"yes"))
            .await;
        admin.expect_bytes(&ack(0x40, i)).await;
    }
    let mut c = connect(
        ProtocolVersion::V5,
        "alice-q",
        Some("alice"),
        Some("pw-alice"),
    );
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(600);
    let mut alice = b.v5_client(c, true).await;
    for _ in 0..2 {
        let m = alice.recv_publish().await;
        assert_eq!(m.topic, "home/hall");
    }
    assert_eq!(b.broker.stats.dropped_queue_full.load(Ordering::Relaxed), 0);
    assert_eq!(
        b.broker.stats.acl_denied_delivery.load(Ordering::Relaxed),
        5
    );
    b.stop().await;
}

#[tokio::test]
async fn a_session_resumed_by_another_client_gets_only_what_that_client_may_read() {
    let dir = temp("acl-resume");
    let b = broker_with(Some(acl_users(&dir)), Some(ACL), &dir).await;
    let persistent = |user: Option<&str>| {
        let mut c = connect(
            ProtocolVersion::V5,
            "shared-id",
            user,
            user.map(|u| format!("pw-{u}")).as_deref(),
        );
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(600);
        c
    };
    let mut alice = b.v5_client(persistent(Some("alice")), false).await;
    alice.sub_v5(1, "home/#", QoS::AtLeastOnce).await;
    drop(alice);
    b.wait_offline("shared-id").await;
    // Queued for alice, checked against alice's rules on the way in.
    let mut admin = login(&b, ProtocolVersion::V311, "admin-r", Some("admin")).await;
    admin
        .send(&publish("home/hall", 1, 1, false, false, b"for alice"))
        .await;
    admin.expect_bytes(&ack(0x40, 1)).await;
    // An anonymous client resumes the same Client ID: it may not read home/#.
    let mut other = b.v5_client(persistent(None), true).await;
    other.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(
        b.broker.stats.acl_denied_delivery.load(Ordering::Relaxed),
        1
    );
    b.stop().await;
}

#[tokio::test]
async fn a_shared_group_gives_a_message_to_a_member_who_may_read_it() {
    let dir = temp("acl-share");
    let b = broker_with(Some(acl_users(&dir)), Some(ACL), &dir).await;
    // alice may not read home/secret, bob may; both are in one group.
    let mut alice = login(&b, ProtocolVersion::V5, "share-alice", Some("alice")).await;
    alice.sub_v5(1, "$share/g/home/#", QoS::AtLeastOnce).await;
    let mut bob = login(&b, ProtocolVersion::V5, "share-bob", Some("bob")).await;
    bob.sub_v5(1, "$share/g/home/#", QoS::AtLeastOnce).await;
    let mut admin = login(&b, ProtocolVersion::V311, "admin-s", Some("admin")).await;
    for i in 1..=4u16 {
        admin
            .send(&publish("home/secret", 1, i, false, false, b"s"))
            .await;
        admin.expect_bytes(&ack(0x40, i)).await;
    }
    for _ in 0..4 {
        let m = bob.recv_publish().await;
        assert_eq!(m.topic, "home/secret");
        bob.send_packet(&Packet::PubAck(tether::wire::packet::Ack::new(m.packet_id)))
            .await;
    }
    alice.expect_silence(Duration::from_millis(200)).await;
    // Nothing was refused: each message went to a member who may read it.
    assert_eq!(
        b.broker.stats.acl_denied_delivery.load(Ordering::Relaxed),
        0
    );
    b.stop().await;
}
