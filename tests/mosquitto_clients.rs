//! Scripted checks with the real Mosquitto command-line clients (`mosquitto_pub`,
//! `mosquitto_sub`, Debian's mosquitto-clients 2.0) against the BUILT `tether` binary.
//!
//! The clients must be installed: `.ci/run` installs them and a missing one fails there; on a
//! machine without them (a plain `cargo test`) each test says it is skipped and why.
mod bin_support;
#[path = "common/outside.rs"]
mod outside;

use std::time::{Duration, Instant};

use bin_support::*;

/// Stop a `mosquitto_sub` the way a user does with Ctrl-C / `kill`: on SIGTERM it sends
/// DISCONNECT (reason 0) and exits 0.
fn stop_cleanly(mut sub: Proc) {
    sub.sigterm();
    let st = sub.expect_exit(WAIT);
    assert!(
        st.success(),
        "mosquitto_sub did not exit 0 on SIGTERM: {st}\n{}",
        sub.dump()
    );
    assert!(
        sub.stdout().contains("sending DISCONNECT"),
        "mosquitto_sub did not disconnect cleanly\n{}",
        sub.dump()
    );
}

/// The persistent-session part of the issue's scripted check, 3.1.1: subscribe with
/// `-c -i fixedid -q 1`, stop the subscriber with `stop`, publish 20 QoS 1 messages, start the
/// subscriber again with the same Client ID: it must receive all 20, in order.
fn persistent_311_round_trip(tag: &str, stop: impl FnOnce(Proc)) {
    let broker = Broker::start();
    persistent_311_round_trip_on(&broker, broker.port, &[], tag, stop);
}

/// `persistent_311_round_trip` against `broker` on `port`, every client given `extra` flags
/// (e.g. `--cafile` for a TLS listener).
fn persistent_311_round_trip_on(
    broker: &Broker,
    port: u16,
    extra: &[&str],
    tag: &str,
    stop: impl FnOnce(Proc),
) {
    let id = format!("fixedid-{tag}");
    let filter = format!("{tag}/#");
    let topic = format!("{tag}/m");
    let mut sub_args: Vec<&str> = extra.to_vec();
    sub_args.extend(["-c", "-i", &id, "-q", "1", "-t", &filter, "-v"]);

    // First run: wait for the SUBACK so the subscription certainly exists, then stop it.
    let mut first = sub_args.to_vec();
    first.push("-d");
    let sub = sub_spawn(port, &first);
    assert_eq!(wait_subscribed(&sub), "1", "granted QoS\n{}", sub.dump());
    stop(sub);

    // 20 QoS 1 messages while it is away; each mosquitto_pub exits 0 only after its PUBACK.
    let expected: Vec<String> = (1..=20).map(|i| format!("{topic} msg-{i}")).collect();
    for i in 1..=20 {
        let msg = format!("msg-{i}");
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["-q", "1", "-t", &topic, "-m", &msg]);
        pub_ok(port, &args);
    }

    // Back with the same Client ID and Clean Session = 0: every queued message, in order.
    let mut again = sub_args.to_vec();
    again.extend(["-C", "20", "-W", "10"]);
    let f = run(
        "mosquitto_sub",
        mosquitto("mosquitto_sub", port, &again),
        Duration::from_secs(15),
    );
    let got = messages(&f.stdout, &topic);
    assert_eq!(
        got,
        expected,
        "resumed 3.1.1 session must deliver the 20 queued QoS 1 messages in order \
         [MQTT-3.1.2-4, MQTT-4.6.0-6]\nexit: {}\nstderr: {}\nbroker log:\n{}",
        f.status,
        f.stderr,
        broker.log()
    );
    assert!(
        f.status.success(),
        "mosquitto_sub: {}\n{}",
        f.status,
        f.stderr
    );
}

/// The issue's scripted check, MQTT 3.1.1, subscriber stopped cleanly (DISCONNECT): a
/// persistent session (Clean Session = 0) keeps its subscription and queues QoS 1 messages
/// while the client is away [MQTT-3.1.2-4, MQTT-3.1.2-5]; they are delivered on reconnect, in
/// order [MQTT-4.6.0-6].
#[test]
fn issue_script_311_persistent_session_gets_all_20_in_order() {
    if !outside::require(
        "issue_script_311_persistent_session_gets_all_20_in_order",
        "mosquitto_sub",
        "Debian package mosquitto-clients",
    ) {
        return;
    }
    persistent_311_round_trip("t", stop_cleanly);
}

/// Same scenario with the subscriber killed (SIGKILL: no DISCONNECT, the TCP connection just
/// drops, as when a device loses power). Messages published before the broker even notices
/// the loss may be written to the dead socket; they must be resent on reconnect
/// [MQTT-4.4.0-1], so still all 20 arrive, in order.
#[test]
fn issue_script_311_killed_subscriber_gets_all_20_in_order() {
    if !outside::require(
        "issue_script_311_killed_subscriber_gets_all_20_in_order",
        "mosquitto_sub",
        "Debian package mosquitto-clients",
    ) {
        return;
    }
    persistent_311_round_trip("k", |mut sub| {
        sub.kill();
    });
}

/// MQTT 5 Session Expiry Interval (`-x`): a session with `-x 60` outlives its connection and
/// receives, on a reconnect within 60 s, the QoS 1 messages published meanwhile, in order
/// [MQTT-3.1.2-23]. A session with `-x 2` is gone 3.5 s after the disconnect: a reconnect then
/// gets none of the messages published to the old session.
#[test]
fn v5_session_expiry_interval_keeps_then_expires_the_session() {
    if !outside::require(
        "v5_session_expiry_interval_keeps_then_expires_the_session",
        "mosquitto_sub",
        "Debian package mosquitto-clients",
    ) {
        return;
    }
    let broker = Broker::start();
    let port = broker.port;
    let sub_base = ["-V", "5", "-c", "-i", "v5id", "-q", "1", "-t", "v5/#", "-v"];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        a
    }

    // Part 1: -x 60, away for well under 60 s: everything is delivered.
    let sub = sub_spawn(port, &with(&sub_base, &["-x", "60", "-d"]));
    assert_eq!(wait_subscribed(&sub), "1", "granted QoS\n{}", sub.dump());
    stop_cleanly(sub);
    let expected: Vec<String> = (1..=10).map(|i| format!("v5/kept m{i}")).collect();
    for i in 1..=10 {
        pub_ok(
            port,
            &[
                "-V",
                "5",
                "-q",
                "1",
                "-t",
                "v5/kept",
                "-m",
                &format!("m{i}"),
            ],
        );
    }
    let f = run(
        "mosquitto_sub",
        mosquitto(
            "mosquitto_sub",
            port,
            &with(&sub_base, &["-x", "60", "-C", "10", "-W", "10"]),
        ),
        Duration::from_secs(15),
    );
    assert_eq!(
        messages(&f.stdout, "v5/"),
        expected,
        "session with expiry 60 s resumed within 60 s must get every queued message in order\n\
         exit: {}\nstderr: {}\nbroker log:\n{}",
        f.status,
        f.stderr,
        broker.log()
    );

    // Part 2: -x 2. Stop, publish to the (still existing) session, wait 3.5 s, come back.
    let sub = sub_spawn(port, &with(&sub_base, &["-x", "2", "-d"]));
    wait_subscribed(&sub);
    stop_cleanly(sub);
    let parked_at = Instant::now();
    for i in 1..=3 {
        pub_ok(
            port,
            &[
                "-V",
                "5",
                "-q",
                "1",
                "-t",
                "v5/lost",
                "-m",
                &format!("x{i}"),
            ],
        );
    }
    // Otherwise the messages might have missed the session and the check below would prove
    // nothing about expiry.
    assert!(
        parked_at.elapsed() < Duration::from_secs(2),
        "publishing took {:?}: longer than the 2 s expiry, the check would be vacuous",
        parked_at.elapsed()
    );
    // The scenario is about wall-clock time: 1.5 s past the 2 s expiry.
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(parked_at.elapsed()));

    // Back: once subscribed, publish a marker. Had the session survived, its queued messages
    // would be sent right after CONNACK, before the marker; so the first (and only) message
    // must be the marker.
    let mut sub = sub_spawn(
        port,
        &with(&sub_base, &["-x", "2", "-d", "-C", "1", "-W", "10"]),
    );
    wait_subscribed(&sub);
    pub_ok(
        port,
        &["-V", "5", "-q", "1", "-t", "v5/marker", "-m", "fresh"],
    );
    let st = sub.expect_exit(WAIT);
    assert_eq!(
        messages(&sub.stdout(), "v5/"),
        vec!["v5/marker fresh".to_string()],
        "a session with expiry 2 s must be gone 3.5 s after the disconnect [MQTT-3.1.2-23]\n\
         {}\nbroker log:\n{}",
        sub.dump(),
        broker.log()
    );
    assert!(st.success(), "mosquitto_sub: {st}\n{}", sub.dump());
}

/// QoS 2 end to end with the CLI clients, in 3.1.1 and 5: the publisher completes
/// PUBLISH/PUBREC/PUBREL/PUBCOMP with the broker, and the subscriber (granted QoS 2) gets the
/// message at QoS 2 with its own four-packet exchange, exactly once [MQTT-4.3.3].
#[test]
fn qos2_end_to_end_v311_and_v5() {
    if !outside::require(
        "qos2_end_to_end_v311_and_v5",
        "mosquitto_sub",
        "Debian package mosquitto-clients",
    ) {
        return;
    }
    let broker = Broker::start();
    for (v, tag) in [("mqttv311", "q2v3"), ("5", "q2v5")] {
        let filter = format!("{tag}/#");
        let topic = format!("{tag}/a");
        let payload = format!("exactly once over {v}");
        let id = format!("{tag}-sub");
        let mut sub = sub_spawn(
            broker.port,
            &[
                "-V", v, "-d", "-i", &id, "-q", "2", "-t", &filter, "-v", "-C", "1", "-W", "10",
            ],
        );
        assert_eq!(wait_subscribed(&sub), "2", "granted QoS\n{}", sub.dump());

        let p = pub_ok(
            broker.port,
            &["-V", v, "-d", "-q", "2", "-t", &topic, "-m", &payload],
        );
        for step in ["received PUBREC", "sending PUBREL", "received PUBCOMP"] {
            assert!(
                p.stdout.contains(step),
                "{v}: publisher's QoS 2 flow lacks {step:?}\n{}",
                p.stdout
            );
        }
        assert!(
            p.stdout.contains("received PUBCOMP (Mid: 1, RC:0)"),
            "{v}: PUBCOMP must be a success\n{}",
            p.stdout
        );

        let st = sub.expect_exit(WAIT);
        assert!(st.success(), "{v}: mosquitto_sub {st}\n{}", sub.dump());
        let out = sub.stdout();
        assert!(
            out.contains(&format!("received PUBLISH (d0, q2, r0, m1, '{topic}'")),
            "{v}: delivery must be a QoS 2, non-retained PUBLISH\n{out}"
        );
        for step in [
            "sending PUBREC (m1",
            "received PUBREL (Mid: 1)",
            "sending PUBCOMP (m1)",
        ] {
            assert!(
                out.contains(step),
                "{v}: subscriber's QoS 2 flow lacks {step:?}\n{out}"
            );
        }
        assert_eq!(
            messages(&out, &topic),
            vec![format!("{topic} {payload}")],
            "{v}: `-v` output"
        );
    }
}

/// Retained messages [MQTT-3.3.1-5, MQTT-3.3.1-6]: a message published with `-r` is
/// delivered to a subscriber that arrives later, with RETAIN set, shown by `-v` as
/// `topic payload`; in both protocol versions. A zero-length retained message clears it
/// [MQTT-3.3.1-10, MQTT-3.3.1-11]: a later subscriber then gets only live traffic.
#[test]
fn retained_message_reaches_later_subscriber_and_can_be_cleared() {
    if !outside::require(
        "retained_message_reaches_later_subscriber_and_can_be_cleared",
        "mosquitto_sub",
        "Debian package mosquitto-clients",
    ) {
        return;
    }
    let broker = Broker::start();
    let port = broker.port;
    pub_ok(port, &["-r", "-q", "1", "-t", "ret/x", "-m", "kept value"]);

    for v in ["mqttv311", "5"] {
        let f = run(
            "mosquitto_sub",
            mosquitto(
                "mosquitto_sub",
                port,
                &["-V", v, "-d", "-t", "ret/#", "-v", "-C", "1", "-W", "10"],
            ),
            Duration::from_secs(15),
        );
        assert!(
            f.status.success(),
            "{v}: {}\n{}\n{}",
            f.status,
            f.stdout,
            f.stderr
        );
        assert_eq!(
            messages(&f.stdout, "ret/"),
            vec!["ret/x kept value".to_string()],
            "{v}: `-v` output of a later subscriber\n{}",
            f.stdout
        );
        assert!(
            f.stdout
                .contains("received PUBLISH (d0, q0, r1, m0, 'ret/x'"),
            "{v}: a retained message sent because of a new subscription has RETAIN = 1 \
             [MQTT-3.3.1-8]\n{}",
            f.stdout
        );
    }

    // Clear it (`-n`: zero-length payload), then subscribe again. Retained messages are sent
    // right after SUBACK, so if ret/x were still retained it would come before the live message
    // published only once the SUBACK was seen.
    pub_ok(port, &["-r", "-q", "1", "-t", "ret/x", "-n"]);
    let mut sub = sub_spawn(port, &["-d", "-t", "ret/#", "-v", "-C", "1", "-W", "10"]);
    wait_subscribed(&sub);
    pub_ok(port, &["-q", "1", "-t", "ret/y", "-m", "live"]);
    let st = sub.expect_exit(WAIT);
    assert!(st.success(), "{}", sub.dump());
    assert_eq!(
        messages(&sub.stdout(), "ret/"),
        vec!["ret/y live".to_string()],
        "cleared retained message must not be delivered\n{}",
        sub.dump()
    );
}

/// Graceful shutdown: SIGTERM makes the broker send DISCONNECT 0x8B (Server shutting down) to
/// its MQTT 5 clients and exit with status 0 within 5 s. mosquitto_sub reacts to a server
/// DISCONNECT by printing `Received DISCONNECT (139)` (with `-d`) and exiting 0; had the
/// broker just dropped the TCP connection, mosquitto_sub would keep reconnecting instead of
/// exiting, so its exit and that line are tied to the DISCONNECT.
#[test]
fn sigterm_disconnects_v5_clients_with_0x8b_and_exits_0() {
    if !outside::require(
        "sigterm_disconnects_v5_clients_with_0x8b_and_exits_0",
        "mosquitto_sub",
        "Debian package mosquitto-clients",
    ) {
        return;
    }
    let mut broker = Broker::start();
    let mut sub = sub_spawn(
        broker.port,
        &[
            "-V",
            "5",
            "-d",
            "-i",
            "shutdown-sub",
            "-t",
            "sd/#",
            "-v",
            "-W",
            "30",
        ],
    );
    wait_subscribed(&sub);

    broker.proc.sigterm();
    let st = broker
        .proc
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "broker still running 5 s after SIGTERM\n{}",
                broker.proc.dump()
            )
        });
    assert_eq!(
        st.code(),
        Some(0),
        "broker exit status\n{}",
        broker.proc.dump()
    );
    broker.wait_log(&["shutting down"], WAIT);

    let st = sub.expect_exit(Duration::from_secs(5));
    assert!(
        sub.stdout().contains("Received DISCONNECT (139)"),
        "subscriber must receive DISCONNECT with reason 0x8B Server shutting down\n{}\n\
         broker:\n{}",
        sub.dump(),
        broker.proc.dump()
    );
    assert_eq!(st.code(), Some(0), "mosquitto_sub exit\n{}", sub.dump());
}

#[path = "common/pki.rs"]
mod pki;

/// A subscriber with `extra` (TLS or credential flags) gets one message that a publisher with
/// the same flags sends, on `port`.
fn round_trip_with(port: u16, extra: &[&str], topic: &str) {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-q", "1", "-t", topic, "-d", "-v"]);
    let sub = sub_spawn(port, &args);
    assert_eq!(wait_subscribed(&sub), "1", "granted QoS\n{}", sub.dump());
    let mut pub_args: Vec<&str> = extra.to_vec();
    pub_args.extend(["-q", "1", "-t", topic, "-m", "secured"]);
    pub_ok(port, &pub_args);
    let want = format!("{topic} secured");
    sub.wait_line(Stream::Stdout, "the message", WAIT, |l| l == want);
    stop_cleanly(sub);
}

/// The real Mosquitto clients against TLS, mutual-TLS and password listeners of one broker:
/// `--cafile`, `--cert/--key`, `-u/-P`. Certificates come from a CA made in the test; the
/// password file from `tether passwd`.
#[test]
fn mosquitto_clients_over_tls_mtls_and_passwords() {
    if !outside::require(
        "mosquitto_clients_over_tls_mtls_and_passwords",
        "mosquitto_sub",
        "Debian package mosquitto-clients",
    ) {
        return;
    }
    let ca = pki::Pki::new("mosq-tls");
    let server = ca.server();
    let device = ca.client("device-1");
    let dir = Dir::new("mosq-auth");
    std::fs::create_dir_all(&dir.0).expect("dir");
    let passwd = dir.0.join("passwd");
    let st = std::process::Command::new(TETHER)
        .args(["passwd", "-I", "1000"])
        .arg(&passwd)
        .args(["alice", "s3cret"])
        .status()
        .expect("tether passwd");
    assert!(st.success());
    let (tls_port, mtls_port, pw_port) = (free_port(), free_port(), free_port());
    let config = dir.0.join("tether.toml");
    let (cert, key, cafile) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
        ca.ca.display().to_string(),
    );
    std::fs::write(
        &config,
        format!(
            "[listener]\n\
             bind = \"127.0.0.1:{tls_port}\"\n\
             tls = {{ cert = \"{cert}\", key = \"{key}\" }}\n\
             [[listeners]]\n\
             bind = \"127.0.0.1:{mtls_port}\"\n\
             tls = {{ cert = \"{cert}\", key = \"{key}\", client_ca = \"{cafile}\", require_client_cert = true }}\n\
             [[listeners]]\n\
             bind = \"127.0.0.1:{pw_port}\"\n\
             allow_anonymous = false\n\
             [auth]\n\
             password_file = \"{}\"\n",
            passwd.display()
        ),
    )
    .expect("config");
    let broker = Broker::start_config(&config, tls_port);

    // TLS with the CA file; the broker's certificate names 127.0.0.1.
    round_trip_with(broker.port, &["--cafile", &cafile], "tls/t");
    // A persistent session over TLS gets every QoS 1 message published while it was away.
    persistent_311_round_trip_on(
        &broker,
        broker.port,
        &["--cafile", &cafile],
        "tlsp",
        stop_cleanly,
    );
    // Mutual TLS: with a client certificate it works; without, the connection fails.
    let (dcert, dkey) = (
        device.cert.display().to_string(),
        device.key.display().to_string(),
    );
    round_trip_with(
        mtls_port,
        &["--cafile", &cafile, "--cert", &dcert, "--key", &dkey],
        "mtls/t",
    );
    let f = run(
        "mosquitto_pub",
        mosquitto(
            "mosquitto_pub",
            mtls_port,
            &["--cafile", &cafile, "-t", "x", "-m", "x", "-q", "1"],
        ),
        WAIT,
    );
    assert!(!f.status.success(), "mTLS without a certificate succeeded");
    // Username and password; a wrong password is refused (exit code non-zero, "not
    // authorised" / "bad username or password").
    round_trip_with(pw_port, &["-u", "alice", "-P", "s3cret"], "pw/t");
    let f = run(
        "mosquitto_pub",
        mosquitto(
            "mosquitto_pub",
            pw_port,
            &["-u", "alice", "-P", "wrong", "-t", "x", "-m", "x"],
        ),
        WAIT,
    );
    assert!(!f.status.success(), "wrong password accepted");
    // CONNACK return code 4, as mosquitto_pub reports it (not a network or TLS error).
    assert!(
        f.stderr
            .to_lowercase()
            .contains("bad user name or password"),
        "{}",
        f.stderr
    );
    let f = run(
        "mosquitto_pub",
        mosquitto("mosquitto_pub", pw_port, &["-t", "x", "-m", "x"]),
        WAIT,
    );
    assert!(!f.status.success(), "anonymous accepted where not allowed");
    // Return code 5.
    assert!(
        f.stderr.to_lowercase().contains("not authori"),
        "{}",
        f.stderr
    );
}

/// SIGHUP on the running binary re-reads the certificate: clients trusting the new CA get
/// in, clients trusting only the old one no longer do.
#[test]
fn sighup_reloads_the_tls_certificate_of_the_running_binary() {
    if !outside::require(
        "sighup_reloads_the_tls_certificate_of_the_running_binary",
        "mosquitto_sub",
        "Debian package mosquitto-clients",
    ) {
        return;
    }
    let first = pki::Pki::new("hup-1");
    let second = pki::Pki::new("hup-2");
    let dir = Dir::new("hup");
    std::fs::create_dir_all(&dir.0).expect("dir");
    let (cert, key) = (dir.0.join("server.pem"), dir.0.join("server.key"));
    let s1 = first.server();
    std::fs::copy(&s1.cert, &cert).expect("copy");
    std::fs::copy(&s1.key, &key).expect("copy");
    let port = free_port();
    let config = dir.0.join("tether.toml");
    std::fs::write(
        &config,
        format!(
            "[listener]\nbind = \"127.0.0.1:{port}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("config");
    let broker = Broker::start_config(&config, port);
    let (ca1, ca2) = (
        first.ca.display().to_string(),
        second.ca.display().to_string(),
    );
    pub_ok(port, &["--cafile", &ca1, "-t", "x", "-m", "before"]);

    let s2 = second.server();
    std::fs::copy(&s2.cert, &cert).expect("copy");
    std::fs::copy(&s2.key, &key).expect("copy");
    signal(broker.proc.pid(), "-HUP");
    broker.wait_log(&["TLS certificate reloaded"], WAIT);
    pub_ok(port, &["--cafile", &ca2, "-t", "x", "-m", "after"]);
    let f = run(
        "mosquitto_pub",
        mosquitto(
            "mosquitto_pub",
            port,
            &["--cafile", &ca1, "-t", "x", "-m", "old CA"],
        ),
        WAIT,
    );
    assert!(!f.status.success(), "the old certificate is still served");
}
