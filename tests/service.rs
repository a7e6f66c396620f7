//! Running tether as a service, tested on the BUILT binary: configuration from flags, files
//! and `TETHER_` variables (the container contract), several listeners, log formats, signals
//! (SIGTERM with v3 and v5 clients, SIGHUP reload), the Prometheus endpoint, `$SYS`, and the
//! admin API with `tether sessions`.
mod bin_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use bin_support::*;

/// `tether args...` with `env` set, run to completion.
fn tether_env(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut cmd = Command::new(TETHER);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run("tether", cmd, WAIT)
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; returns the status and body.
fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect to the admin API");
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{auth}\r\n"
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, body.to_string())
}

/// The value of an unlabelled (or exactly labelled) sample in a Prometheus text page.
fn sample(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{page}"))
}

/// Start the broker with an admin listener on a free port; returns it and the admin port.
fn broker_with_admin(extra_toml: &str, args: &[&str]) -> (Broker, u16, TempFile) {
    let admin = free_port();
    let file = TempFile::new(
        "admin",
        &format!("{extra_toml}\n[admin]\nbind = \"127.0.0.1:{admin}\"\ntoken = \"s3cret\"\n"),
    );
    let mut all = vec!["-c", file.arg()];
    all.extend_from_slice(args);
    let broker = Broker::start_with(&all);
    broker.wait_log(
        &["admin API and metrics listening", &admin.to_string()],
        WAIT,
    );
    (broker, admin, file)
}

/// README "Configuration": `TETHER_TABLE__KEY` overrides a key (the value read as TOML), a
/// flag beats the variable, and the variable beats the file.
#[test]
fn env_variables_override_the_file_and_flags_override_both() {
    let file = TempFile::new("env", "[session]\nmax_inflight = 3\n");
    let f = tether_env(
        &["--check-config", "-c", file.arg(), "-b", "127.0.0.1:1999"],
        &[
            ("TETHER_SESSION__MAX_INFLIGHT", "9"),
            ("TETHER_LOG__LEVEL", "debug"),
            ("TETHER_LISTENER__BIND", "127.0.0.1:1888"),
            ("TETHER_SYS_INTERVAL_SECS", "7"),
        ],
    );
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert!(f.stdout.contains("max_inflight: 9"), "{}", f.stdout);
    assert!(f.stdout.contains("level: \"debug\""), "{}", f.stdout);
    assert!(f.stdout.contains("sys_interval_secs: 7"), "{}", f.stdout);
    assert!(
        f.stdout.contains("bind: \"127.0.0.1:1999\""),
        "{}",
        f.stdout
    );
}

/// An unknown `TETHER_` variable (here the single-underscore spelling) is an error naming it,
/// and so is a value that is not valid for its key.
#[test]
fn unknown_or_bad_env_variable_is_an_error_naming_it() {
    let f = tether_env(&["--check-config"], &[("TETHER_SESSION_MAX_INFLIGHT", "9")]);
    assert_eq!(f.code(), Some(1), "{f:?}");
    assert!(
        f.stderr.contains("TETHER_SESSION_MAX_INFLIGHT"),
        "{}",
        f.stderr
    );

    let f = tether_env(
        &["--check-config"],
        &[("TETHER_SESSION__MAX_INFLIGHT", "0")],
    );
    assert_eq!(f.code(), Some(1), "{f:?}");
    assert!(f.stderr.contains("session.max_inflight"), "{}", f.stderr);
    assert!(
        f.stderr.contains("TETHER_SESSION__MAX_INFLIGHT"),
        "{}",
        f.stderr
    );

    // The broker itself refuses to start, not only --check-config.
    let f = tether_env(&["-b", "127.0.0.1:0"], &[("TETHER_NO_SUCH_KEY", "1")]);
    assert_eq!(f.code(), Some(1), "{f:?}");
    assert!(f.stderr.contains("TETHER_NO_SUCH_KEY"), "{}", f.stderr);
}

/// A bad value in the file: exit 1, the key and its line named.
#[test]
fn bad_config_value_names_the_key_and_the_line() {
    let file = TempFile::new(
        "badline",
        "[listener]\nbind = \"127.0.0.1:1883\"\nmax_connections = 0\n",
    );
    let f = tether_env(&["--check-config", "-c", file.arg()], &[]);
    assert_eq!(f.code(), Some(1), "{f:?}");
    assert!(
        f.stderr.contains("listener.max_connections"),
        "{}",
        f.stderr
    );
    assert!(f.stderr.contains("line 3"), "{}", f.stderr);
}

/// `-d DIR` (or `TETHER_DATA_DIR`, as a container sets it) is stored as `data_dir`; at start
/// the directory is created if missing and checked writable.
#[test]
fn data_dir_from_flag_or_env_is_stored_and_created() {
    let base = std::env::temp_dir().join(format!("tether-test-{}-data", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let dir = base.join("state");
    let d = dir.to_str().expect("utf-8 path");

    let f = tether_env(&["--check-config", "-d", d], &[]);
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert!(f.stdout.contains(d), "{}", f.stdout);
    let f = tether_env(&["--check-config"], &[("TETHER_DATA_DIR", d)]);
    assert!(f.stdout.contains(d), "{}", f.stdout);

    let broker = Broker::start_with(&["-d", d]);
    broker.wait_log(&["data directory ready"], WAIT);
    assert!(dir.is_dir(), "{d} not created\n{}", broker.log());
    drop(broker);
    let _ = std::fs::remove_dir_all(&base);
}

/// `-b` given twice: the broker listens on both addresses, and a client on either gets
/// messages published on the other.
#[test]
fn repeated_bind_flag_listens_on_every_address() {
    let second = free_port();
    let b2 = format!("127.0.0.1:{second}");
    let broker = Broker::start_with(&["-b", &b2]);
    broker.wait_log(&["listening for MQTT", &b2], WAIT);
    let mut sub = sub_spawn(second, &["-d", "-t", "two/#", "-v", "-C", "1", "-W", "10"]);
    wait_subscribed(&sub);
    pub_ok(broker.port, &["-q", "1", "-t", "two/x", "-m", "across"]);
    let st = sub.expect_exit(WAIT);
    assert!(st.success(), "{}", sub.dump());
    assert_eq!(messages(&sub.stdout(), "two/"), vec!["two/x across"]);
}

/// `--log-format json`: every log line is a JSON object.
#[test]
fn log_format_json_writes_json_lines() {
    let broker = Broker::start_with(&["--log-format", "json"]);
    let line = broker.wait_log(&["listening for MQTT"], WAIT);
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(v["level"], "INFO", "{line}");
    assert_eq!(v["fields"]["message"], "listening for MQTT", "{line}");
}

/// SIGTERM with a 3.1.1 and a 5.0 client connected: the v5 client receives DISCONNECT 0x8B,
/// the 3.1.1 client's connection is closed (3.1.1 has no server DISCONNECT), and the broker
/// exits 0 within 5 s.
#[test]
fn sigterm_closes_v311_and_v5_clients_and_exits_0() {
    let mut broker = Broker::start();
    let mut v5 = sub_spawn(
        broker.port,
        &["-V", "5", "-d", "-i", "term-v5", "-t", "t/#", "-W", "30"],
    );
    wait_subscribed(&v5);
    // A raw 3.1.1 client: CONNECT (clean session, keep-alive 0), expect CONNACK 0.
    let mut v3 = TcpStream::connect_timeout(&broker.addr(), WAIT).expect("connect");
    v3.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut connect = vec![
        0x10, 0x13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0, 0, 7,
    ];
    connect.extend_from_slice(b"term-v3");
    v3.write_all(&connect).expect("send CONNECT");
    let mut connack = [0u8; 4];
    v3.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);

    let t0 = Instant::now();
    broker.proc.sigterm();
    let st = broker
        .proc
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM\n{}", broker.proc.dump()));
    assert_eq!(st.code(), Some(0), "{}", broker.proc.dump());
    assert!(t0.elapsed() < Duration::from_secs(5));

    let mut rest = Vec::new();
    match v3.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "3.1.1 client got bytes {rest:?}"),
        // A reset is also a close.
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "not closed: {e}"),
    }
    v5.expect_exit(WAIT);
    assert!(
        v5.stdout().contains("Received DISCONNECT (139)"),
        "{}",
        v5.dump()
    );
}

/// SIGHUP re-reads the file: with `log.level` changed from info to debug, debug lines appear
/// (a connection closed before CONNECT is logged at debug); a change of a key that needs a
/// restart is reported as such.
#[test]
fn sighup_reloads_the_log_level() {
    let file = TempFile::new("hup", "[log]\nlevel = \"info\"\n");
    let broker = Broker::start_with(&["-c", file.arg()]);
    assert!(!broker.log().contains("DEBUG"), "{}", broker.log());

    std::fs::write(
        file.path(),
        "[log]\nlevel = \"debug\"\n[session]\nmax_inflight = 5\n",
    )
    .expect("rewrite config");
    signal(broker.pid(), "-HUP");
    let line = broker.wait_log(&["configuration reloaded"], WAIT);
    assert!(line.contains("log.level"), "{line}");
    assert!(
        line.contains("needs_restart=[\"session.max_inflight\"]"),
        "{line}"
    );

    drop(TcpStream::connect_timeout(&broker.addr(), WAIT).expect("connect"));
    broker.wait_log(&["DEBUG", "closed before CONNECT"], WAIT);
}

/// `/metrics` over HTTP: the counters move when messages flow, sessions are counted by state,
/// the store's commits and size are reported; without the token the endpoint answers 401. The
/// `$SYS` tree carries the same figures.
#[test]
fn metrics_counters_move_when_messages_flow() {
    let (broker, admin, _file) = broker_with_admin("sys_interval_secs = 1", &[]);
    let (status, _) = http(admin, "GET", "/metrics", None);
    assert_eq!(status, 401);
    let (status, before) = http(admin, "GET", "/metrics", Some("s3cret"));
    assert_eq!(status, 200, "{before}");
    assert_eq!(
        sample(&before, "tether_messages_received_total{qos=\"1\"}"),
        0
    );

    let sub = sub_spawn(
        broker.port,
        &["-d", "-c", "-i", "metrics-sub", "-q", "1", "-t", "m/#"],
    );
    wait_subscribed(&sub);
    for i in 0..3 {
        pub_ok(broker.port, &["-q", "1", "-t", "m/x", "-m", &i.to_string()]);
    }
    sub.wait_line(Stream::Stdout, "third message", WAIT, |l| l == "2");

    let (_, after) = http(admin, "GET", "/metrics", Some("s3cret"));
    assert_eq!(
        sample(&after, "tether_messages_received_total{qos=\"1\"}"),
        3,
        "{after}"
    );
    assert_eq!(
        sample(&after, "tether_messages_sent_total{qos=\"1\"}"),
        3,
        "{after}"
    );
    assert_eq!(
        sample(&after, "tether_messages_sent_total{qos=\"0\"}"),
        0,
        "{after}"
    );
    assert!(
        sample(&after, "tether_bytes_received_total")
            > sample(&before, "tether_bytes_received_total"),
        "{after}"
    );
    assert!(sample(&after, "tether_bytes_sent_total") > 0, "{after}");
    assert_eq!(
        sample(&after, "tether_sessions{state=\"online\"}"),
        1,
        "{after}"
    );
    assert_eq!(sample(&after, "tether_subscriptions"), 1, "{after}");
    assert!(
        sample(&after, "tether_connections_accepted_total") >= 4,
        "{after}"
    );
    assert!(after.contains("tether_messages_dropped_total{cause=\"queue_full\"} 0"));
    // The store (persistence is on): the QoS 1 messages to the persistent session were
    // committed before their PUBACKs, so the commits moved, and its files take room.
    assert!(
        sample(&after, "tether_store_commit_seconds_count")
            > sample(&before, "tether_store_commit_seconds_count"),
        "{after}"
    );
    assert!(after.contains("# TYPE tether_store_commit_seconds summary"));
    assert!(
        after
            .lines()
            .any(|l| l.starts_with("tether_store_commit_seconds_sum ")),
        "{after}"
    );
    assert!(sample(&after, "tether_store_bytes") > 0, "{after}");
    assert_eq!(sample(&after, "tether_store_failed"), 0, "{after}");

    // The retained value may predate the messages; the next publication (every second)
    // carries the new count.
    let sys = sub_spawn(
        broker.port,
        &["-t", "$SYS/broker/publish/messages/received"],
    );
    sys.wait_line(Stream::Stdout, "$SYS count of at least 3", WAIT, |l| {
        l.trim().parse::<u64>().is_ok_and(|n| n >= 3)
    });
    let sys = sub_spawn(broker.port, &["-t", "$SYS/broker/store/commits"]);
    sys.wait_line(Stream::Stdout, "$SYS store commits", WAIT, |l| {
        l.trim().parse::<u64>().is_ok_and(|n| n >= 3)
    });
}

/// The admin API against a running broker, through `tether sessions` and plain HTTP: list
/// shows an online v5 session with its subscription, show returns it, kick disconnects the
/// client with DISCONNECT 0x98 and leaves the session offline, delete removes it (then show is
/// 404 and the CLI exits 1).
#[test]
fn admin_api_lists_shows_kicks_and_deletes_sessions() {
    let (broker, admin, _file) = broker_with_admin("", &[]);
    let url = format!("http://127.0.0.1:{admin}");
    let cli = |args: &[&str]| {
        let mut all = vec!["sessions", "--admin", &url, "--token", "s3cret"];
        all.extend_from_slice(args);
        tether_env(&all, &[])
    };
    let mut sub = sub_spawn(
        broker.port,
        &[
            "-V",
            "5",
            "-d",
            "-c",
            "-i",
            "adm/1",
            "-x",
            "300",
            "-q",
            "1",
            "-t",
            "adm/#",
            "--will-topic",
            "wills/adm",
            "--will-payload",
            "gone",
        ],
    );
    wait_subscribed(&sub);

    let f = cli(&["list"]);
    assert_eq!(f.code(), Some(0), "{f:?}");
    let row = f
        .stdout
        .lines()
        .find(|l| l.starts_with("adm/1"))
        .unwrap_or_else(|| panic!("{}", f.stdout));
    assert!(row.contains("online") && row.contains("5.0"), "{row}");

    let f = cli(&["show", "adm/1"]);
    assert_eq!(f.code(), Some(0), "{f:?}");
    let v: serde_json::Value = serde_json::from_str(&f.stdout).expect("JSON");
    assert_eq!(v["online"], true);
    assert_eq!(v["expiry_interval_secs"], 300);
    assert_eq!(v["will"], true);
    assert_eq!(v["subscriptions"][0]["filter"], "adm/#");
    assert_eq!(v["subscriptions"][0]["qos"], 1);

    let (status, _) = http(admin, "GET", "/api/sessions", Some("wrong"));
    assert_eq!(status, 401);

    let f = cli(&["kick", "adm/1"]);
    assert_eq!(f.code(), Some(0), "{f:?}");
    sub.wait_line(Stream::Stdout, "DISCONNECT 0x98", WAIT, |l| {
        l.contains("Received DISCONNECT (152)")
    });
    sub.kill();

    let (status, body) = http(admin, "GET", "/api/sessions/adm%2F1", Some("s3cret"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["online"], false, "{body}");
    assert!(
        v["expires_in_secs"].as_u64().is_some_and(|s| s <= 300),
        "{body}"
    );
    let f = cli(&["kick", "adm/1"]);
    assert_eq!(f.code(), Some(1), "kicking an offline client: {f:?}");

    let f = cli(&["delete", "adm/1"]);
    assert_eq!(f.code(), Some(0), "{f:?}");
    let (status, _) = http(admin, "GET", "/api/sessions/adm%2F1", Some("s3cret"));
    assert_eq!(status, 404);
    let f = cli(&["show", "adm/1"]);
    assert_eq!(f.code(), Some(1), "{f:?}");
    assert!(f.stderr.contains("404"), "{}", f.stderr);
    let f = cli(&["list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&f.stdout).expect("JSON");
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{}", f.stdout);
}

const PACKAGED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/tether.toml");

/// The packaged configuration is valid, keeps its state in /var/lib/tether (systemd's
/// StateDirectory=tether, the image's VOLUME) and listens on all interfaces.
#[test]
fn packaged_config_matches_the_unit_and_the_image() {
    let f = tether_env(&["--check-config", "-c", PACKAGED], &[]);
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert!(f.stdout.contains("\"/var/lib/tether\""), "{}", f.stdout);
    assert!(f.stdout.contains("bind: \"0.0.0.0:1883\""), "{}", f.stdout);

    let root = env!("CARGO_MANIFEST_DIR");
    let unit = std::fs::read_to_string(format!("{root}/packaging/tether.service")).expect("unit");
    for line in [
        "StateDirectory=tether",
        "ExecStart=/usr/bin/tether -c /etc/tether/tether.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    let docker = std::fs::read_to_string(format!("{root}/Dockerfile")).expect("Dockerfile");
    for line in [
        "USER tether",
        "VOLUME /var/lib/tether",
        "EXPOSE 1883 8080",
        "COPY packaging/tether.toml /etc/tether/tether.toml",
        "CMD [\"-c\", \"/etc/tether/tether.toml\"]",
    ] {
        assert!(docker.lines().any(|l| l == line), "Dockerfile lacks {line}");
    }
}

/// The image's contract, on the binary: the packaged file plus `-e` variables. Publishing the
/// admin port (`TETHER_ADMIN__BIND=0.0.0.0:8080`) is refused without a token; a non-root user
/// can point the data dir anywhere writable and the broker serves MQTT and the admin API.
#[test]
fn container_env_contract_on_the_packaged_config() {
    let f = tether_env(
        &["--check-config", "-c", PACKAGED],
        &[("TETHER_ADMIN__BIND", "0.0.0.0:8080")],
    );
    assert_eq!(f.code(), Some(1), "{f:?}");
    assert!(f.stderr.contains("admin.token"), "{}", f.stderr);
    let f = tether_env(
        &["--check-config", "-c", PACKAGED],
        &[
            ("TETHER_ADMIN__BIND", "0.0.0.0:8080"),
            ("TETHER_ADMIN__TOKEN", "t0ken"),
        ],
    );
    assert_eq!(f.code(), Some(0), "{f:?}");

    let data = std::env::temp_dir().join(format!("tether-test-{}-image", std::process::id()));
    let admin = free_port();
    let mut cmd = Command::new(TETHER);
    let port = free_port();
    cmd.args(["-c", PACKAGED, "-b", &format!("127.0.0.1:{port}")])
        .env("TETHER_DATA_DIR", &data)
        .env("TETHER_ADMIN__BIND", format!("127.0.0.1:{admin}"))
        .env("TETHER_LOG__FORMAT", "json");
    let p = Proc::spawn("tether", cmd);
    p.wait_line(Stream::Stdout, "admin listening", WAIT, |l| {
        l.contains("admin API and metrics listening") && l.contains(&admin.to_string())
    });
    p.wait_line(Stream::Stdout, "MQTT listening", WAIT, |l| {
        l.contains("listening for MQTT") && l.contains(&port.to_string())
    });
    assert!(data.is_dir());
    let (status, body) = http(admin, "GET", "/health", None);
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    drop(p);
    let _ = std::fs::remove_dir_all(&data);
}
