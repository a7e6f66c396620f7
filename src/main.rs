//! The `tether` command: parse the command line, load the configuration (file, `TETHER_`
//! environment, flags), set up logging, bind, run; SIGHUP reloads what can change live.
//! `tether sessions ...` is a client of a running broker's admin API instead.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tether::broker::Broker;
use tether::config::{Config, ConfigError, ExtraListener, LogFormat, LIVE_KEYS, REFERENCE_TOML};
use tether::net::server::{Listener, Sockets};
use tether::ops::admin_client::{self, AdminClient};
use tether::session::journal::{Journal, NoJournal};
use tether::store::Store;
use tokio::net::TcpListener;
use tracing::{error, info, warn};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{fmt, reload, Registry};

/// tether: an MQTT 3.1.1 / 5.0 broker with sessions done right.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Without it, the embedded defaults are used.
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    config: Option<PathBuf>,
    /// MQTT listener address. Given once or more, it replaces `listener.bind` (the first) and
    /// every `[[listeners]]` entry (the others).
    #[arg(short = 'b', long = "bind", value_name = "HOST:PORT")]
    bind: Vec<SocketAddr>,
    /// Directory for persistent state (`data_dir`; default `tether-data` in the working
    /// directory).
    #[arg(short = 'd', long = "data-dir", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log at debug level.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Log line format, overriding `log.format`.
    #[arg(long = "log-format", value_name = "FORMAT")]
    log_format: Option<FormatArg>,
    /// Parse and validate the configuration, print the effective values, and exit.
    #[arg(long = "check-config")]
    check_config: bool,
    /// Print the annotated reference configuration and exit.
    #[arg(long = "print-default-config")]
    print_default_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect and manage the sessions of a running broker through its admin API.
    Sessions {
        /// Base URL of the admin API (`admin.bind` of the broker).
        #[arg(
            long = "admin",
            value_name = "URL",
            default_value = "http://127.0.0.1:8080"
        )]
        admin: String,
        /// Bearer token (`admin.token`); defaults to $TETHER_ADMIN__TOKEN.
        #[arg(long = "token", value_name = "TOKEN")]
        token: Option<String>,
        #[command(subcommand)]
        action: SessionsAction,
    },
    /// Add, change or delete a user in a password file (Mosquitto's format, `[auth]
    /// password_file`); the broker reads it again on SIGHUP.
    Passwd {
        /// The password file; created when a user is added to a file that does not exist.
        file: PathBuf,
        /// The user to add, change or delete.
        user: String,
        /// The new password; when absent, one line is read from standard input.
        password: Option<String>,
        /// Delete the user instead.
        #[arg(short = 'D', long = "delete")]
        delete: bool,
        /// PBKDF2-SHA512 iterations of the new hash.
        #[arg(short = 'I', long = "iterations", default_value_t = tether::auth::password::DEFAULT_ITERATIONS)]
        iterations: u32,
    },
}

#[derive(Debug, Subcommand)]
enum SessionsAction {
    /// List every session (online and offline).
    List {
        /// Print the JSON the API returns instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one session as JSON.
    Show {
        /// Client Identifier.
        client_id: String,
    },
    /// Disconnect a connected client (MQTT 5: DISCONNECT 0x98); its session stays.
    Kick {
        /// Client Identifier.
        client_id: String,
    },
    /// Delete a session (a connected client is disconnected first).
    Delete {
        /// Client Identifier.
        client_id: String,
    },
}

type LevelHandle = reload::Handle<LevelFilter, Registry>;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Sessions {
        admin,
        token,
        action,
    }) = &args.command
    {
        return sessions(admin, token.clone(), action);
    }
    if let Some(Command::Passwd {
        file,
        user,
        password,
        delete,
        iterations,
    }) = &args.command
    {
        return passwd(file, user, password.as_deref(), *delete, *iterations);
    }
    if args.print_default_config {
        print!("{REFERENCE_TOML}");
        return ExitCode::SUCCESS;
    }
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }

    let level = level_filter(&config.log.level);
    let (filter, handle) = reload::Layer::new(level);
    // Colour only on a terminal: journald, files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (text, json) = match config.log.format {
        LogFormat::Text => (Some(fmt::layer().with_target(false).with_ansi(ansi)), None),
        LogFormat::Json => (None, Some(fmt::layer().json().with_target(false))),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();

    let opened = if config.persistence.enabled {
        let dir = config.data_dir_or_default();
        if let Err(e) = prepare_data_dir(&dir) {
            error!(data_dir = %dir.display(), "data directory unusable: {e}");
            return ExitCode::FAILURE;
        }
        info!(data_dir = %dir.display(), fsync = ?config.persistence.fsync, "data directory ready");
        let started = std::time::Instant::now();
        match Store::open(config.store_config()) {
            Ok(o) => {
                for d in &o.dropped {
                    warn!("store: dropped a torn or corrupt tail: {d}");
                }
                info!(
                    files = o.files,
                    bytes = o.bytes,
                    records = o.state.records,
                    ms = started.elapsed().as_millis() as u64,
                    "store read"
                );
                Some(o)
            }
            Err(e) => {
                error!("cannot open the store: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        info!("persistence off: sessions and retained messages live in memory only");
        None
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, config, handle, opened))
}

async fn run(
    args: Args,
    config: Config,
    handle: LevelHandle,
    opened: Option<tether::store::Opened>,
) -> ExitCode {
    // Signal handlers go in before anything binds: a SIGHUP arriving once the broker is
    // reachable must not hit the default action (which terminates the process).
    let signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A password or ACL file that does not load stops the start, rather than a broker that
    // refuses everyone (or no one).
    if let Err(e) = tether::auth::gate::Gate::load(&config.auth) {
        error!("cannot load [auth] files: {e}");
        return ExitCode::FAILURE;
    }
    let mut sockets = Sockets::default();
    for spec in config.listener_specs() {
        let bind = spec.bind;
        match TcpListener::bind(bind).await {
            Ok(socket) => match Listener::new(socket, spec) {
                Ok(l) => sockets.mqtt.push(l),
                Err(e) => {
                    error!(%bind, "cannot set up TLS: {e}");
                    return ExitCode::FAILURE;
                }
            },
            Err(e) => {
                error!(%bind, "cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if !config.admin.bind.is_empty() {
        match TcpListener::bind(&config.admin.bind).await {
            Ok(l) => sockets.admin = Some(l),
            Err(e) => {
                error!(bind = %config.admin.bind, "cannot listen for the admin API: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let persistent = opened.is_some();
    let journal: Arc<dyn Journal> = match &opened {
        Some(o) => o.store.clone(),
        None => Arc::new(NoJournal),
    };
    let broker = Broker::with_journal(Arc::new(config), journal.clone());
    if let Some(o) = opened {
        let started = std::time::Instant::now();
        broker.restore(tether::store::recovery::recovered(o.state, o.last_write));
        info!(
            ms = started.elapsed().as_millis() as u64,
            "recovery finished"
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(signals.handle(args, broker.clone(), handle, stop_tx));
    tether::net::server::run_sockets(sockets, broker, async {
        let _ = stop_rx.await;
    })
    .await;
    if persistent {
        // Everything appended (the sessions parked by the drain above) is written and fsynced.
        journal.close();
        info!("store flushed");
    }
    info!("stopped");
    ExitCode::SUCCESS
}

/// Defaults, then the file, then `TETHER_` variables, then flags.
fn load_config(args: &Args) -> Result<Config, ConfigError> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.apply_env(std::env::vars())?;
    if let Some((first, rest)) = args.bind.split_first() {
        config.listener.bind = first.to_string();
        config.listeners = rest
            .iter()
            .map(|b| ExtraListener::plain(b.to_string()))
            .collect();
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = Some(dir.clone());
    }
    if args.verbose {
        config.log.level = "debug".to_string();
    }
    match args.log_format {
        Some(FormatArg::Text) => config.log.format = LogFormat::Text,
        Some(FormatArg::Json) => config.log.format = LogFormat::Json,
        None => {}
    }
    config.validate()?;
    Ok(config)
}

fn level_filter(level: &str) -> LevelFilter {
    level
        .parse::<tracing::Level>()
        .map(LevelFilter::from_level)
        .unwrap_or(LevelFilter::INFO)
}

/// Create the data directory if needed and prove it writable, so a container volume or a
/// systemd StateDirectory with the wrong owner fails at start, not at the first write.
fn prepare_data_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".tether-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok")?;
    std::fs::remove_file(&probe)
}

/// The signals the daemon handles.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// SIGINT / SIGTERM: the first starts the graceful shutdown, a second exits at once.
    /// SIGHUP: reload.
    async fn handle(
        mut self,
        args: Args,
        broker: Arc<Broker>,
        handle: LevelHandle,
        stop: tokio::sync::oneshot::Sender<()>,
    ) {
        let mut stop = Some(stop);
        loop {
            let hup = self.next().await;
            if hup {
                reload(&args, &broker, &handle);
                continue;
            }
            match stop.take() {
                Some(tx) => {
                    info!("signal received; shutting down gracefully (again to exit at once)");
                    let _ = tx.send(());
                }
                None => {
                    warn!("second signal: exiting at once");
                    std::process::exit(1);
                }
            }
        }
    }

    /// Waits for the next signal: `true` for SIGHUP, `false` for SIGINT / SIGTERM.
    async fn next(&mut self) -> bool {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => false,
                _ = self.term.recv() => false,
                _ = self.hup.recv() => true,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            false
        }
    }
}

/// SIGHUP: read the configuration again (file, environment, flags). Keys in `LIVE_KEYS` take
/// effect now; the others are logged as needing a restart. A bad file changes nothing.
fn reload(args: &Args, broker: &Broker, handle: &LevelHandle) {
    let new = match load_config(args) {
        Ok(c) => c,
        Err(e) => {
            error!("reload failed, keeping the running configuration: {e}");
            // Certificates and [auth] files are re-read anyway, as the running
            // configuration names them.
            broker.reload_files(&broker.live_config().auth);
            return;
        }
    };
    broker.reload_files(&new.auth);
    let old = broker.live_config();
    let changed = old.changed_keys(&new);
    let (live, restart): (Vec<String>, Vec<String>) = changed
        .into_iter()
        .partition(|k| LIVE_KEYS.contains(&k.as_str()));
    if old.log.level != new.log.level {
        if let Err(e) = handle.modify(|f| *f = level_filter(&new.log.level)) {
            error!("cannot change the log level: {e}");
        }
    }
    broker.set_live_config(Arc::new(new));
    info!(applied = ?live, needs_restart = ?restart, "configuration reloaded");
}

/// `tether passwd ...`.
fn passwd(
    file: &std::path::Path,
    user: &str,
    password: Option<&str>,
    delete: bool,
    iterations: u32,
) -> ExitCode {
    use tether::auth::password::update_file;
    let password = match (delete, password) {
        (true, _) => None,
        (false, Some(p)) => Some(p.to_string()),
        (false, None) => {
            eprint!("Password for {user}: ");
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("tether: cannot read the password: {e}");
                return ExitCode::FAILURE;
            }
            let p = line.trim_end_matches(['\r', '\n']).to_string();
            if p.is_empty() {
                eprintln!("tether: empty password");
                return ExitCode::FAILURE;
            }
            Some(p)
        }
    };
    match update_file(
        file,
        user,
        password.as_deref().map(str::as_bytes),
        iterations,
    ) {
        Ok(existed) => {
            let what = match (delete, existed) {
                (true, _) => "deleted",
                (false, true) => "changed",
                (false, false) => "added",
            };
            eprintln!("{user}: {what} in {}", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether: {}: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}

/// `tether sessions ...`.
fn sessions(url: &str, token: Option<String>, action: &SessionsAction) -> ExitCode {
    let token = token.or_else(|| std::env::var("TETHER_ADMIN__TOKEN").ok());
    let client = match AdminClient::new(url, token) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match action {
        SessionsAction::List { json } => client.list().and_then(|list| {
            if *json {
                serde_json::to_string_pretty(&list)
                    .map(|s| println!("{s}"))
                    .map_err(|e| e.to_string())
            } else {
                print!("{}", admin_client::table(&list));
                Ok(())
            }
        }),
        SessionsAction::Show { client_id } => client.show(client_id).map(|s| print!("{s}")),
        SessionsAction::Kick { client_id } => client
            .kick(client_id)
            .map(|()| println!("kicked {client_id}")),
        SessionsAction::Delete { client_id } => client
            .delete(client_id)
            .map(|()| println!("deleted {client_id}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: {e}");
            ExitCode::FAILURE
        }
    }
}
