//! Mock OpenAI-compatible LLM provider for testing the ai-key-failover filter.
//! See README.md for the command line and the `/_mock/` control API.

mod config;
mod server;
mod state;
mod util;

use std::future::IntoFuture;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::config::Config;

const USAGE: &str = "usage: mock-provider [--port N] [--host 127.0.0.1] [--keys FILE] [--demo]

  --port N     port to listen on (default 0: pick a free one)
  --host H     address to bind (default 127.0.0.1)
  --keys FILE  initial key configuration (same JSON as PUT /_mock/keys)
  --demo       demo keys demo-key-1/2/3 limited to 3/5/20 requests per 10 s

Prints `LISTENING <port>` on stdout once bound, then one line per request on stderr.";

/// How long in-flight requests may take to finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Default, PartialEq)]
struct Args {
    port: u16,
    host: String,
    keys: Option<String>,
    demo: bool,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut out = Args {
        host: "127.0.0.1".to_string(),
        ..Args::default()
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--port" => {
                let v = value()?;
                out.port = v.parse().map_err(|_| format!("invalid port {v:?}"))?;
            }
            "--host" => out.host = value()?,
            "--keys" => out.keys = Some(value()?),
            "--demo" => out.demo = true,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if out.demo && out.keys.is_some() {
        return Err("--demo and --keys cannot be combined".into());
    }
    Ok(Some(out))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("mock-provider: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = if args.demo {
        Config::demo()
    } else if let Some(path) = &args.keys {
        let parsed = std::fs::read(path)
            .map_err(|e| format!("cannot read {path}: {e}"))
            .and_then(|b| Config::parse(&b).map_err(|e| format!("{path}: {e}")));
        match parsed {
            Ok(c) => c,
            Err(e) => {
                eprintln!("mock-provider: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        Config::default()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mock-provider: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "mock-provider: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, config: Config) -> Result<(), String> {
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", args.host, args.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let key_count = config.keys.len();
    let shared = state::shared(config);

    let signal = shutdown_signal()?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "LISTENING {}", addr.port())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    let _ = writeln!(
        std::io::stderr(),
        "mock-provider: listening on http://{addr} ({key_count} keys configured)"
    );

    let stopping = Arc::new(Notify::new());
    let notify = stopping.clone();
    let server = axum::serve(listener, server::router(shared))
        .with_graceful_shutdown(async move {
            signal.await;
            let _ = writeln!(std::io::stderr(), "mock-provider: shutting down");
            notify.notify_one();
        })
        .into_future();
    tokio::select! {
        res = server => res.map_err(|e| format!("server error: {e}")),
        // Do not wait forever for slow (delayed or streaming) requests.
        () = async { stopping.notified().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => Ok(()),
    }
}

/// Installs the SIGINT/SIGTERM handlers now (so a signal sent right after
/// `LISTENING` is not missed) and returns a future that resolves on either.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_command_line() {
        let a = parse(&[]).unwrap().unwrap();
        assert_eq!((a.port, a.host.as_str(), a.demo), (0, "127.0.0.1", false));
        let a = parse(&["--port", "8080", "--host=0.0.0.0", "--keys", "k.json"])
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.port, a.host.as_str(), a.keys.as_deref()),
            (8080, "0.0.0.0", Some("k.json"))
        );
        assert!(parse(&["--demo"]).unwrap().unwrap().demo);
        assert!(parse(&["--help"]).unwrap().is_none());
        assert!(parse(&["--port"]).is_err());
        assert!(parse(&["--port", "x"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["--demo", "--keys", "f"]).is_err());
    }
}
