//! The `tether` command: parse the command line, load the configuration, bind, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tether::config::{Config, REFERENCE_TOML};
use tokio::net::TcpListener;
use tracing::{error, info};

/// tether: an MQTT 3.1.1 / 5.0 broker with sessions done right.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Without it, the embedded defaults are used.
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Listener address, overriding `listener.bind`.
    #[arg(short = 'b', long = "bind", value_name = "HOST:PORT")]
    bind: Option<SocketAddr>,
    /// Log at debug level.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Parse and validate the configuration, print the effective values, and exit.
    #[arg(long = "check-config")]
    check_config: bool,
    /// Print the annotated reference configuration and exit.
    #[arg(long = "print-default-config")]
    print_default_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_default_config {
        print!("{REFERENCE_TOML}");
        return ExitCode::SUCCESS;
    }
    let mut config = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tether: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Config::default(),
    };
    if let Some(bind) = args.bind {
        config.listener.bind = bind.to_string();
    }
    if args.verbose {
        config.log.level = "debug".to_string();
    }
    if args.check_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }

    let level = config
        .log
        .level
        .parse::<tracing::Level>()
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        // Colour only on a terminal: journald, files and pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

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
    runtime.block_on(async move {
        let listener = match TcpListener::bind(&config.listener.bind).await {
            Ok(l) => l,
            Err(e) => {
                error!(bind = %config.listener.bind, "cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        };
        tether::server::run(listener, config, shutdown_signal()).await;
        info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
