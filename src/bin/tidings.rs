//! The `tidings` command: parse the CLI, start tracing, bind, serve until a signal.

use std::cell::Cell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use mimalloc::MiMalloc;
use tidings::{Config, Gateway};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// tidings: a real-time update gateway (WebSocket, Server-Sent Events and HTTP
/// (long-)polling fan-out of topic publications).
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
        /// Address to listen on, host:port (default 127.0.0.1:8080). A host name such as
        /// localhost:8080 is resolved at startup.
        #[arg(long)]
        listen: Option<String>,
        /// Serve a WebSocket echo endpoint at /echo (conformance testing).
        #[arg(long)]
        echo: bool,
        /// Log filter, e.g. `info` or `tidings=debug`.
        #[arg(long, env = "TIDINGS_LOG", default_value = "info")]
        log: String,
    },
}

/// Parses the command line, with `serve --help` listing every configuration key.
fn parse_cli() -> Cli {
    let command = Cli::command().mut_subcommand("serve", |serve| {
        serve
            .after_help(
                "Every setting is also a config-file key or a TIDINGS_<KEY> variable: --help \
                 lists them, docs/OPERATIONS.md explains them.",
            )
            .after_long_help(settings_help())
    });
    let mut matches = command.get_matches();
    Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.exit())
}

/// The keys of the configuration, from `Config::default()` as TOML so the list cannot
/// drift from the struct.
fn settings_help() -> String {
    let mut help = String::from(
        "Settings, later layers winning: built-in defaults < the TOML file (--config) < \
         TIDINGS_<KEY> environment variables < flags. Every key below can be set in the \
         file as `key = value` or as the variable TIDINGS_<KEY> (upper case, e.g. \
         max_queued_bytes is TIDINGS_MAX_QUEUED_BYTES). Durations are written \"500ms\", \
         \"30s\", \"1m 30s\". docs/OPERATIONS.md (section Configuration) explains each \
         key and its trade-off.\n\nKeys and their defaults:\n",
    );
    let text = match toml::to_string(&Config::default()) {
        Ok(text) => text,
        Err(e) => {
            help.push_str(&format!("  (cannot list them: {e})\n"));
            return help;
        }
    };
    let mut indent = "  ";
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // A section (`[auth]`): its keys are `auth.<key>`, TIDINGS_AUTH_<KEY>.
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let upper = section.to_ascii_uppercase();
            help.push_str(&format!(
                "  {section} = the [{section}] section; TIDINGS_{upper}_<KEY> sets {section}.<key>:\n"
            ));
            indent = "    ";
            continue;
        }
        help.push_str(indent);
        help.push_str(line);
        help.push('\n');
    }
    help
}

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`; libmimalloc-sys
/// names the options around it but not this one).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Return freed pages to the OS at once instead of after 10 ms of further allocator
    // activity on the same thread: the runtime threads that ran a storm of handshakes go
    // idle right after it, and would otherwise keep those pages resident. Measured at
    // 10,000 idle connections: 2,100-2,800 bytes per connection with the default,
    // 470-750 with immediate purging.
    // SAFETY: setting an allocator option before the runtime starts; mimalloc reads it on
    // each purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    let Command::Serve {
        config,
        listen,
        echo,
        log,
    } = parse_cli().command;
    init_tracing(&log);
    let mut flags = Vec::new();
    if let Some(listen) = listen {
        flags.push(("listen".to_string(), toml::Value::from(listen)));
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
        .on_thread_park(return_freed_memory)
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
    let listener = tidings::listen(config.listen).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen))
    })?;
    let addr = listener.local_addr()?;
    let gateway = Gateway::try_new(config)?;
    // Before the listening line: whoever reads it may send a SIGHUP at once.
    #[cfg(unix)]
    tokio::spawn(reload_on_hangup(gateway.clone())?);
    let scheme = if gateway.is_tls() { "https" } else { "http" };
    println!("tidings listening on {scheme}://{addr}");
    tracing::info!(%addr, tls = gateway.is_tls(), "listening");
    // Wake a runtime worker every second, so that one which went idle after a burst parks
    // again later and collects what other threads freed meanwhile (see
    // `return_freed_memory`).
    tokio::spawn(async {
        let mut tick = tokio::time::interval(COLLECT_EVERY);
        loop {
            tick.tick().await;
        }
    });
    gateway.serve(listener, shutdown_signal()).await
}

/// Reloads the TLS certificate and key on every SIGHUP (the usual "reload" signal, e.g.
/// systemd's `ExecReload=kill -HUP $MAINPID` after a certificate renewal). Without TLS a
/// SIGHUP is logged and otherwise ignored, rather than ending the process.
#[cfg(unix)]
fn reload_on_hangup(
    gateway: Gateway,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(async move {
        while hangups.recv().await.is_some() {
            if gateway.is_tls() {
                // The outcome is logged and counted by the reload itself.
                let _ = gateway.reload_tls();
            } else {
                tracing::info!("SIGHUP: nothing to reload (no [tls] configured)");
            }
        }
    })
}

/// The least time between two collections on one runtime thread.
const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// The least time between two forced collections on one runtime thread. A forced collection
/// also purges the allocator's arenas, and costs milliseconds on a busy heap: at most every
/// 5 s it adds under 0.3 us per delivery at 1,000 subscribers and 10 publications/s.
const FORCE_COLLECT_EVERY: Duration = Duration::from_secs(5);

/// Called when a runtime worker goes idle: returns the memory it freed to the OS.
///
/// Handshakes allocate transient HTTP buffers on the runtime's workers, and the upgraded
/// sockets then move to the shard threads. After a connection storm the workers go idle
/// with those freed pages (and blocks freed by other threads) still in their heaps; a
/// collection hands them back, where otherwise they would cost more than the connections
/// themselves (about 250 bytes of live state each).
fn return_freed_memory() {
    thread_local! {
        static LAST: Cell<Option<(Instant, Instant)>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        let now = Instant::now();
        let (collected, forced) = last
            .get()
            .unwrap_or((now - FORCE_COLLECT_EVERY, now - FORCE_COLLECT_EVERY));
        if now.duration_since(forced) >= FORCE_COLLECT_EVERY {
            last.set(Some((now, now)));
            // SAFETY: mi_collect trims the calling thread's heap and the shared arenas,
            // which mimalloc synchronises itself.
            unsafe { libmimalloc_sys::mi_collect(true) };
        } else if now.duration_since(collected) >= COLLECT_EVERY {
            last.set(Some((now, forced)));
            // SAFETY: as above.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    });
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

/// Logs to stderr, filtered by `--log` / `TIDINGS_LOG`; with the `console` feature (and
/// `--cfg tokio_unstable`), also serves tokio-console on 127.0.0.1:6669
/// (`TOKIO_CONSOLE_BIND` to change it).
fn init_tracing(log: &str) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_new(log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(logs);
    #[cfg(feature = "console")]
    let registry = registry.with(console_subscriber::spawn());
    registry.init();
}
