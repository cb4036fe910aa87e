//! The `tidings` command: parse the CLI, start tracing, bind, serve until a signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use tidings::{Config, Gateway};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// tidings: a real-time update gateway (WebSocket fan-out of topic publications).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. Settings: defaults < --config file < TIDINGS_* variables < flags.
    Serve {
        /// TOML configuration file.
        #[arg(long, env = "TIDINGS_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve a WebSocket echo endpoint at /echo (conformance testing).
        #[arg(long)]
        echo: bool,
        /// Log filter, e.g. `info` or `tidings=debug`.
        #[arg(long, env = "TIDINGS_LOG", default_value = "info")]
        log: String,
    },
}

fn main() -> ExitCode {
    let Command::Serve {
        config,
        listen,
        echo,
        log,
    } = Cli::parse().command;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut flags = Vec::new();
    if let Some(listen) = listen {
        flags.push(("listen".to_string(), toml::Value::from(listen.to_string())));
    }
    if echo {
        flags.push(("echo".to_string(), toml::Value::from(true)));
    }
    let config = match Config::load(config.as_deref(), std::env::vars(), &flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tidings: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tidings: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidings: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen))
        })?;
    let addr = listener.local_addr()?;
    println!("tidings listening on http://{addr}");
    tracing::info!(%addr, "listening");
    Gateway::new(config)
        .serve(listener, shutdown_signal())
        .await
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
