//! The `herald` command line: serve, genconfig, token, check-config.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use herald_core::auth::{ConnectClaims, sign_hs256, unix_now};

use crate::config::{Config, LogFormat, Overrides, generate};

#[derive(Parser, Debug)]
#[command(name = "herald", version, about = "Herald: a real-time push server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a node (the default when no command is given).
    Serve(ServeArgs),
    /// Write a commented herald.toml with fresh random secrets.
    Genconfig {
        /// Where to write it.
        #[arg(long, short, default_value = "herald.toml")]
        output: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print a connection token (JWT, HS256) signed with the configured secret.
    Token {
        #[arg(long, short, env = "HERALD_CONFIG")]
        config: Option<PathBuf>,
        /// User id (`sub`).
        #[arg(long, short)]
        user: String,
        /// Lifetime, e.g. "1h", "30s"; "0" for a token that never expires.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Channels to subscribe server-side, comma-separated.
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Connection info (JSON) shown in presence and publications.
        #[arg(long)]
        info: Option<String>,
        /// Secret to sign with instead of the config's client.token_hmac_secret.
        #[arg(long)]
        secret: Option<String>,
    },
    /// Load generator: connection ramps and fan-out against Herald, nats-server, mosquitto.
    Bench(herald_bench::BenchArgs),
    /// Validate a config file; names the bad key and exits 2 on error.
    CheckConfig {
        #[arg(long, short, env = "HERALD_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Config file (TOML).
    #[arg(long, short, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address, overrides server.listen.
    #[arg(long)]
    pub listen: Option<String>,
    /// Node name, overrides server.name.
    #[arg(long)]
    pub name: Option<String>,
    /// Log level or filter, overrides log.level.
    #[arg(long)]
    pub log_level: Option<String>,
}

fn random_secret() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

fn init_logs(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
        .or_else(|_| config.log.level.parse())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        name: args.name,
        log_level: args.log_level,
    };
    let mut config = Config::load(args.config.as_deref(), &overrides)?;
    init_logs(&config);
    if config.client.token_hmac_secret.is_empty() && !config.client.allow_anonymous {
        config.client.token_hmac_secret = random_secret();
        println!(
            "herald: no client.token_hmac_secret configured; using a random one for this run.\n\
             herald: get a token:  herald token --user alice --secret {}\n\
             herald: or write a config with fresh secrets:  herald genconfig",
            config.client.token_hmac_secret
        );
    }
    if config.api.key.is_empty() && !config.api.insecure {
        config.api.key = random_secret();
        println!(
            "herald: no api.key configured; the server API key for this run is {}",
            config.api.key
        );
    }
    let shutdown_timeout = config.server.shutdown_timeout;
    let drain_duration = config.shutdown.drain_duration;
    let admin_page = !config.admin.password.is_empty();
    let mqtt_tls = config.mqtt.tls;
    let server = crate::server::start(config).await?;
    // Tests and scripts read this line to learn the port.
    let scheme = if server.tls { "https" } else { "http" };
    println!("herald: listening on {scheme}://{}", server.addr);
    if let Some(a) = server.admin_addr {
        println!("herald: admin listening on {scheme}://{a}");
    }
    if let Some(a) = server.api_addr {
        println!("herald: api listening on {scheme}://{a}");
    }
    if let Some(a) = server.mqtt_addr {
        let scheme = if mqtt_tls { "mqtts" } else { "mqtt" };
        println!("herald: mqtt listening on {scheme}://{a}");
    }
    tracing::info!(addr = %server.addr, node = %server.node.name, "herald serving");
    if admin_page {
        let at = server.admin_addr.unwrap_or(server.addr);
        tracing::info!(url = %format!("http://{at}/admin/"), "admin page enabled");
    }
    tokio::select! {
        _ = crate::server::signal() => tracing::info!("stop signal received"),
        _ = server.drain_requested() => tracing::info!("drain requested"),
    }
    // Drain, then stop; a second signal disconnects the remaining clients at once.
    let ops = server.ops();
    ops.drain();
    let bound = drain_duration + shutdown_timeout + Duration::from_secs(5);
    let stopped = tokio::time::timeout(bound, server.stopped());
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            r = &mut stopped => {
                if r.is_err() {
                    tracing::warn!("shutdown took too long; exiting");
                }
                break;
            }
            _ = crate::server::signal() => {
                tracing::info!("second stop signal: disconnecting the remaining clients now");
                ops.hurry();
            }
        }
    }
    Ok(())
}

pub fn genconfig(output: PathBuf, force: bool) -> anyhow::Result<()> {
    if output.exists() && !force {
        bail!("{} exists; pass --force to overwrite", output.display());
    }
    std::fs::write(&output, generate(&random_secret(), &random_secret()))
        .with_context(|| format!("writing {}", output.display()))?;
    println!("herald: wrote {}", output.display());
    Ok(())
}

pub fn token(
    config: Option<PathBuf>,
    user: String,
    ttl: String,
    channels: Vec<String>,
    info: Option<String>,
    secret: Option<String>,
) -> anyhow::Result<()> {
    let secret = match secret {
        Some(s) => s,
        None => {
            Config::load(config.as_deref(), &Overrides::default())?
                .client
                .token_hmac_secret
        }
    };
    if secret.is_empty() {
        bail!("client.token_hmac_secret is empty: pass --config FILE or --secret S");
    }
    let ttl = herald_core::duration::parse(&ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    let now = unix_now();
    let info = match info {
        Some(text) => Some(
            herald_protocol::json::raw_from_str(&text)
                .map_err(|_| anyhow::anyhow!("--info: not JSON"))?,
        ),
        None => None,
    };
    let claims = ConnectClaims {
        sub: user,
        exp: (!ttl.is_zero()).then(|| now + ttl.as_secs()),
        iat: Some(now),
        info,
        channels: channels.into_iter().filter(|c| !c.is_empty()).collect(),
        ..Default::default()
    };
    println!("{}", sign_hs256(&secret, &claims)?);
    Ok(())
}

pub fn check_config(path: PathBuf) -> anyhow::Result<()> {
    let c = Config::load(Some(&path), &Overrides::default())?;
    println!(
        "herald: {} is valid ({} namespaces, engine {:?})",
        path.display(),
        c.namespaces.len(),
        c.engine.kind
    );
    if c.client.allowed_origins.is_empty() && crate::http::gate::cookie_auth(&c.client) {
        println!(
            "herald: client.proxy.connect forwards Cookie and client.allowed_origins is empty: \
             browsers may connect only from this server's own origin (Origin host = Host); \
             list the origins of your pages in client.allowed_origins to allow others"
        );
    }
    Ok(())
}
