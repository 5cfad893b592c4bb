//! `qodd` entry point: CLI → validated config → tracing → [`qod_daemon::run`] → exit code.
use std::process::ExitCode;

use clap::Parser as _;
use qod_daemon::config::{Cli, Config, DEFAULT_CONFIG, EXIT_BAD_CONFIG, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qodd: invalid configuration: {:#}", anyhow::Error::from(e));
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    if cli.check_config {
        return match Config::effective_toml(&cli) {
            Ok(text) => {
                print!("{text}");
                eprintln!("qodd: configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("qodd: invalid configuration: {:#}", anyhow::Error::from(e));
                ExitCode::from(EXIT_BAD_CONFIG as u8)
            }
        };
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qodd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(qod_daemon::run(
        config,
        Some(std::sync::Arc::new(move || Config::load(&cli))),
        shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // An address that cannot be used, or pools that clash with another cluster node's,
            // is a configuration error, like the others (64).
            let code = if matches!(
                e,
                qod_daemon::RunError::Listen { .. }
                    | qod_daemon::RunError::Cluster(qod_daemon::cluster::ClusterError::Refused(_))
            ) {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            };
            eprintln!("qodd: {:#}", anyhow::Error::from(e));
            code
        }
    }
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("qodd: cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
