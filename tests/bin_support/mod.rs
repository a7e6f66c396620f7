//! Shared support for tests that run the BUILT `tether` binary as a child process and drive it
//! with the real Mosquitto command-line clients (`mosquitto_pub` / `mosquitto_sub`).
//!
//! Everything here is bounded: every wait has a deadline and fails the test with the output
//! seen so far, and every child process is killed (by its own pid, `Child::kill`) when its
//! guard is dropped, so a failing test leaves nothing running.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The binary under test, built by Cargo for integration tests.
pub const TETHER: &str = env!("CARGO_BIN_EXE_tether");

/// Upper bound for waiting on the broker to accept connections.
pub const STARTUP: Duration = Duration::from_secs(10);
/// Generous upper bound for a client command or a log line; a failing test fails, it does not
/// hang.
pub const WAIT: Duration = Duration::from_secs(10);
/// Poll period for connect attempts and exit checks.
const POLL: Duration = Duration::from_millis(20);

/// A loopback port that was free a moment ago: bind 127.0.0.1:0, read the port, drop it.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Remove ANSI colour sequences (tracing's fmt layer colours its output even into a pipe).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ----------------------------------------------------------------------------------------------
// Child processes with their output collected line by line.

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Default)]
struct Collected {
    stdout: Vec<String>,
    stderr: Vec<String>,
    /// Number of streams that reached end of file (0..=2).
    closed: usize,
}

type Shared = Arc<(Mutex<Collected>, Condvar)>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Collected> {
    shared.0.lock().unwrap_or_else(|e| e.into_inner())
}

fn reader(src: impl Read + Send + 'static, which: Stream, shared: Shared) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']));
            let mut c = lock(&shared);
            match which {
                Stream::Stdout => c.stdout.push(line),
                Stream::Stderr => c.stderr.push(line),
            }
            shared.1.notify_all();
        }
        lock(&shared).closed += 1;
        shared.1.notify_all();
    })
}

/// A running child whose stdout and stderr are read by two threads (so it never blocks on a
/// full pipe). Killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    shared: Shared,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawn `cmd` with piped stdout/stderr and null stdin. A spawn failure panics with `name`.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {name} ({cmd:?}): {e}"));
        let shared: Shared = Arc::default();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let readers = vec![
            reader(out, Stream::Stdout, shared.clone()),
            reader(err, Stream::Stderr, shared.clone()),
        ];
        Proc {
            name: name.to_string(),
            child,
            shared,
            readers,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines of one stream seen so far.
    pub fn lines(&self, which: Stream) -> Vec<String> {
        let c = lock(&self.shared);
        match which {
            Stream::Stdout => c.stdout.clone(),
            Stream::Stderr => c.stderr.clone(),
        }
    }

    pub fn stdout(&self) -> String {
        self.lines(Stream::Stdout).join("\n")
    }

    pub fn stderr(&self) -> String {
        self.lines(Stream::Stderr).join("\n")
    }

    /// Both streams, for failure messages.
    pub fn dump(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}\n---",
            self.name,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }

    /// Wait (at most `timeout`) until a line of `which` satisfies `pred`; return it. Panics
    /// with everything seen so far if it does not come, or if the stream closes first.
    pub fn wait_line(
        &self,
        which: Stream,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.shared);
        loop {
            let lines = match which {
                Stream::Stdout => &c.stdout,
                Stream::Stderr => &c.stderr,
            };
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            if c.closed == 2 || now >= deadline {
                drop(c);
                let why = if now >= deadline {
                    format!("not within {timeout:?}")
                } else {
                    "output closed".to_string()
                };
                panic!(
                    "{}: waited for {what} on {which:?}: {why}\n{}",
                    self.name,
                    self.dump()
                );
            }
            c = self
                .shared
                .1
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Has it exited? (Non-blocking.)
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Wait for the child to exit, at most `timeout` (polling every 20 ms), then for its output
    /// to be read to the end. Returns `None` on timeout (the child is left running; drop kills
    /// it).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                // The pipes close when the child exits; read what is left.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// `wait_exit`, panicking with the output on timeout.
    pub fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_exit(timeout) {
            Some(s) => s,
            None => panic!(
                "{} (pid {}) still running after {timeout:?}\n{}",
                self.name,
                self.pid(),
                self.dump()
            ),
        }
    }

    /// Send SIGTERM to this child (by its own pid).
    pub fn sigterm(&self) {
        signal(self.pid(), "-TERM");
    }

    /// SIGKILL this child (by its own pid) and reap it.
    pub fn kill(&mut self) -> ExitStatus {
        if self.try_status().is_none() {
            let _ = self.child.kill();
        }
        self.expect_exit(WAIT)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Set the soft RLIMIT_FSIZE of one running process (by pid) with `prlimit(1)` (util-linux),
/// leaving its hard limit unlimited: `Some(bytes)` makes every write past that file offset
/// fail (with EFBIG when the process ignores SIGXFSZ, as under `Broker::start_wrapped` with
/// `trap '' XFSZ`), `None` lifts the limit again. Raising a soft limit up to the hard limit
/// needs no privilege. Panics if prlimit fails.
pub fn set_fsize_limit(pid: u32, bytes: Option<u64>) {
    let value = match bytes {
        Some(n) => format!("--fsize={n}:unlimited"),
        None => "--fsize=unlimited:unlimited".to_string(),
    };
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &value])
        .stdin(Stdio::null())
        .output()
        .expect("run prlimit(1) (util-linux)");
    assert!(
        out.status.success(),
        "prlimit --pid {pid} {value} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Send a signal to one process by pid with `kill(1)` (`libc` is not a dependency).
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill(1)");
    assert!(st.success(), "kill {sig} {pid} failed: {st}");
}

/// A finished command's status and output.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Run `cmd` to completion, at most `timeout`; on timeout kill it and panic with its output.
pub fn run(name: &str, cmd: Command, timeout: Duration) -> Finished {
    let mut p = Proc::spawn(name, cmd);
    let status = p.expect_exit(timeout);
    Finished {
        status,
        stdout: p.stdout(),
        stderr: p.stderr(),
    }
}

// ----------------------------------------------------------------------------------------------
// The broker binary.

/// The `tether` binary running on its own loopback port. Killed on drop.
pub struct Broker {
    pub port: u16,
    pub proc: Proc,
    /// A data directory made for this broker (removed on drop); `None` when the caller chose
    /// one with `-d`.
    pub own_data_dir: Option<PathBuf>,
}

/// A fresh, unique directory name under the system temp dir (not created).
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "tether-test-{}-{tag}-{n}-{nanos}",
        std::process::id()
    ))
}

/// A data directory for a test (not created), removed with everything in it on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        Dir(temp_dir(tag))
    }

    /// The path as a command-line argument.
    pub fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A current-thread runtime for the async clients of a test that drives the binary.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(dir) = self.own_data_dir.take() {
            let _ = self.proc.kill();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Broker {
    /// Start with `-b 127.0.0.1:<free port>` and nothing else (embedded defaults).
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// Start with `-b 127.0.0.1:<free port>` plus `extra` arguments, and wait until it accepts
    /// TCP connections (polling every 20 ms, at most 10 s) and has logged that it listens on
    /// that port. A port lost to another process between probe and bind is retried.
    ///
    /// Persistence is on by default in the binary: unless `extra` names a data directory, the
    /// broker gets a fresh one under the temp dir (removed on drop), so tests never share a
    /// store nor write into the working directory.
    pub fn start_with(extra: &[&str]) -> Broker {
        Broker::start_wrapped(&[], extra)
    }

    /// `start_with`, but run through `wrapper` (a program and its arguments, which must end
    /// by exec'ing the tether path and arguments it is given after them, so the pid is
    /// tether's): e.g. `["sh", "-c", "trap '' XFSZ; exec \"$0\" \"$@\""]` to start tether with
    /// SIGXFSZ ignored. An empty `wrapper` runs tether directly.
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Broker {
        let chosen = extra.iter().any(|a| *a == "-d" || *a == "--data-dir");
        for _attempt in 0..3 {
            let port = free_port();
            let mut cmd = match wrapper.split_first() {
                None => Command::new(TETHER),
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(TETHER);
                    c
                }
            };
            cmd.arg("-b").arg(format!("127.0.0.1:{port}"));
            let own_data_dir = (!chosen).then(|| temp_dir("data"));
            if let Some(d) = &own_data_dir {
                cmd.arg("-d").arg(d);
            }
            cmd.args(extra);
            let mut proc = Proc::spawn("tether", cmd);
            if wait_listening(&mut proc, port) {
                return Broker {
                    port,
                    proc,
                    own_data_dir,
                };
            }
            if let Some(d) = &own_data_dir {
                let _ = std::fs::remove_dir_all(d);
            }
            // It exited: if the port was taken meanwhile, try another one.
            if !proc.stdout().contains("cannot listen") && !proc.stderr().contains("cannot listen")
            {
                panic!("tether exited during startup\n{}", proc.dump());
            }
        }
        panic!("tether could not bind a free port in 3 attempts");
    }

    /// Start with `-c config` alone (its listeners as written, `[listener]` on `port`),
    /// for tests that need several listeners; waits until `port` accepts.
    pub fn start_config(config: &std::path::Path, port: u16) -> Broker {
        let data = temp_dir("data");
        let mut cmd = Command::new(TETHER);
        cmd.arg("-c").arg(config).arg("-d").arg(&data);
        let mut proc = Proc::spawn("tether", cmd);
        assert!(
            wait_listening(&mut proc, port),
            "tether exited during startup\n{}",
            proc.dump()
        );
        Broker {
            port,
            proc,
            own_data_dir: Some(data),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Everything it logged so far (stdout and stderr, colours removed).
    pub fn log(&self) -> String {
        format!("{}\n{}", self.proc.stdout(), self.proc.stderr())
    }

    /// Wait for a log line (on stdout, where tracing writes) containing every one of `parts`.
    pub fn wait_log(&self, parts: &[&str], timeout: Duration) -> String {
        self.proc.wait_line(
            Stream::Stdout,
            &format!("log line with {parts:?}"),
            timeout,
            |l| parts.iter().all(|p| l.contains(p)),
        )
    }
}

/// True once `port` accepts connections and `proc` logged that it listens there; false if
/// `proc` exited first. Panics after `STARTUP`.
fn wait_listening(proc: &mut Proc, port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + STARTUP;
    loop {
        if proc.try_status().is_some() {
            proc.wait_exit(WAIT);
            return false;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            panic!(
                "tether did not accept connections on {addr} within {STARTUP:?}\n{}",
                proc.dump()
            );
        }
        std::thread::sleep(POLL);
    }
    // Make sure it is OUR child that is listening there, not another test's broker.
    let needle = format!("127.0.0.1:{port}");
    proc.wait_line(Stream::Stdout, "\"listening for MQTT\"", STARTUP, |l| {
        l.contains("listening for MQTT") && l.contains(&needle)
    });
    true
}

// ----------------------------------------------------------------------------------------------
// The Mosquitto command-line clients.

/// Panics with a clear message unless `mosquitto_pub` and `mosquitto_sub` can be run: these
/// tests must fail, not pass silently, where the clients are missing.
pub fn require_mosquitto_clients() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let r = CHECKED.get_or_init(|| {
        for tool in ["mosquitto_pub", "mosquitto_sub"] {
            // `--help` exits non-zero; all we need is that the program exists and runs.
            let out = Command::new(tool)
                .arg("--help")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("{tool}: {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !text.contains(tool) {
                return Err(format!("{tool} --help did not identify itself: {text}"));
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!(
            "the Mosquitto command-line clients are required for this test but cannot be run \
             ({e}). Install them: `apt-get install mosquitto-clients` (.ci/run does this in CI)."
        );
    }
}

/// `tool -h 127.0.0.1 -p <port> <args...>`, run through `stdbuf -oL` (coreutils; it execs the
/// tool, so the pid is the tool's): the clients print with stdio, which is block-buffered into
/// a pipe, and tests must see each line (e.g. `Subscribed`) as it is printed.
pub fn mosquitto(tool: &str, port: u16, args: &[&str]) -> Command {
    require_mosquitto_clients();
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", tool])
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args);
    cmd
}

/// Run `mosquitto_pub` with `args` to completion; it must exit 0 (it exits non-zero when the
/// connection or, for QoS > 0, the acknowledgement fails).
pub fn pub_ok(port: u16, args: &[&str]) -> Finished {
    let f = run(
        "mosquitto_pub",
        mosquitto("mosquitto_pub", port, args),
        WAIT,
    );
    assert!(
        f.status.success(),
        "mosquitto_pub {args:?} failed: {}\nstdout: {}\nstderr: {}",
        f.status,
        f.stdout,
        f.stderr
    );
    f
}

/// Start a long-running `mosquitto_sub` with `args`.
pub fn sub_spawn(port: u16, args: &[&str]) -> Proc {
    Proc::spawn("mosquitto_sub", mosquitto("mosquitto_sub", port, args))
}

/// Wait until a `mosquitto_sub -d` has its SUBACK: it prints `Subscribed (mid: N): <granted>`.
/// Returns the granted QoS/reason codes as printed.
pub fn wait_subscribed(sub: &Proc) -> String {
    let l = sub.wait_line(Stream::Stdout, "SUBACK (\"Subscribed\")", WAIT, |l| {
        l.starts_with("Subscribed (mid:")
    });
    l.rsplit(": ").next().unwrap_or_default().to_string()
}

/// The message lines of a `mosquitto_sub -v` (optionally `-d`) output: those that start with
/// `prefix` (the topic), leaving out the debug lines.
pub fn messages(out: &str, prefix: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

// ----------------------------------------------------------------------------------------------
// Temporary files.

/// A file under the system temp dir with a unique name, removed on drop.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(tag: &str, contents: &str) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "tether-test-{}-{tag}-{n}-{nanos}.toml",
            std::process::id()
        ));
        std::fs::write(&path, contents).expect("write temp config");
        TempFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
