//! The `tether` command line, run as a built binary: configuration printing and checking,
//! `-b`, `--version`, and starting on the embedded defaults.
mod bin_support;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use bin_support::*;

fn tether(args: &[&str]) -> Finished {
    let mut cmd = Command::new(TETHER);
    cmd.args(args);
    run("tether", cmd, WAIT)
}

/// README "Command line": `--print-default-config` prints the annotated reference
/// configuration, i.e. exactly `config/tether.toml`, and exits 0.
#[test]
fn print_default_config_prints_the_reference_file() {
    let f = tether(&["--print-default-config"]);
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert!(f.stdout.contains("[listener]"), "{}", f.stdout);
    assert!(f.stdout.contains("max_inflight"), "{}", f.stdout);
    let reference =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tether.toml"))
            .expect("read config/tether.toml");
    // Line-wise, as the capture strips line endings.
    assert_eq!(
        f.stdout.lines().collect::<Vec<_>>(),
        reference.lines().collect::<Vec<_>>(),
        "--print-default-config must print config/tether.toml"
    );
}

/// `--check-config` with a valid file: exit 0 and the effective configuration printed, with
/// the file's values in it.
#[test]
fn check_config_accepts_a_good_file_and_prints_it() {
    let file = TempFile::new(
        "good",
        "[session]\nmax_inflight = 7\n\n[retain]\nmax_messages = 42\n",
    );
    let f = tether(&["--check-config", "-c", file.arg()]);
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert!(f.stdout.contains("max_inflight: 7"), "{}", f.stdout);
    assert!(f.stdout.contains("max_messages: 42"), "{}", f.stdout);
}

/// README "Configuration": unknown keys are refused, so a typo is an error naming the key
/// (and its line), not a silently ignored setting.
#[test]
fn check_config_refuses_an_unknown_key_naming_it_and_the_line() {
    let file = TempFile::new("typo", "[session]\nmax_inflihgt = 3\n");
    let f = tether(&["--check-config", "-c", file.arg()]);
    assert_eq!(f.code(), Some(1), "{f:?}");
    assert!(f.stderr.contains("max_inflihgt"), "{}", f.stderr);
    assert!(f.stderr.contains("line 2"), "{}", f.stderr);
}

/// A value of the right type but outside what the broker accepts: exit 1, the dotted key
/// named.
#[test]
fn check_config_refuses_an_invalid_value_naming_the_dotted_key() {
    let file = TempFile::new("zero", "[session]\nmax_inflight = 0\n");
    let f = tether(&["--check-config", "-c", file.arg()]);
    assert_eq!(f.code(), Some(1), "{f:?}");
    assert!(f.stderr.contains("session.max_inflight"), "{}", f.stderr);
}

/// A configuration file that does not exist is an error (exit 1, path named), not a silent
/// fallback to the defaults.
#[test]
fn check_config_refuses_a_missing_file() {
    let missing = std::env::temp_dir().join(format!(
        "tether-test-{}-does-not-exist.toml",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&missing);
    let path = missing.to_str().expect("utf-8 path");
    let f = tether(&["--check-config", "-c", path]);
    assert_eq!(f.code(), Some(1), "{f:?}");
    assert!(f.stderr.contains(path), "{}", f.stderr);
}

/// README: "-b/--bind overrides `listener.bind`". With a file binding port A and `-b` port B,
/// the broker listens on B (a connection there succeeds and it logs B), not on A; and
/// `--check-config` shows B as the effective value.
#[test]
fn bind_flag_overrides_the_configured_listener() {
    let a = free_port();
    let file = TempFile::new("bind", &format!("[listener]\nbind = \"127.0.0.1:{a}\"\n"));

    let broker = Broker::start_with(&["-c", file.arg()]);
    assert_ne!(broker.port, a);
    TcpStream::connect_timeout(&broker.addr(), Duration::from_secs(2))
        .expect("connect to the -b port");
    let log = broker.log();
    assert!(
        !log.contains(&format!("127.0.0.1:{a}")),
        "must not listen on the configured port {a}\n{log}"
    );
    assert!(
        TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], a)),
            Duration::from_millis(500)
        )
        .is_err(),
        "something listens on the configured port {a}, overridden by -b"
    );

    let b = format!("127.0.0.1:{}", broker.port);
    let f = tether(&["--check-config", "-c", file.arg(), "-b", &b]);
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert!(
        f.stdout.contains(&format!("bind: \"{b}\"")),
        "effective bind must be {b}\n{}",
        f.stdout
    );
}

/// `--version` prints the crate version.
#[test]
fn version_flag_prints_the_version() {
    let f = tether(&["--version"]);
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert_eq!(
        f.stdout.trim(),
        format!("tether {}", env!("CARGO_PKG_VERSION"))
    );
}

/// README: "Without [-c], the embedded defaults are used": the binary with only `-b` starts
/// and accepts an MQTT client (mosquitto_pub gets CONNACK 0 and completes a QoS 1 publish).
#[test]
fn starts_on_embedded_defaults_without_a_config_file() {
    let broker = Broker::start();
    let f = pub_ok(
        broker.port,
        &["-d", "-q", "1", "-t", "defaults/check", "-m", "hello"],
    );
    assert!(
        f.stdout.contains("received CONNACK (0)"),
        "CONNACK must be accepted\n{}",
        f.stdout
    );
    assert!(f.stdout.contains("received PUBACK"), "{}", f.stdout);
}
