use clap::Parser;
use herald_server::cli::{self, Cli, Command};

// `--features system-allocator` keeps the C allocator, which heap profilers (heaptrack,
// massif) intercept; mimalloc allocates on its own and hides from them.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_serve(cli::ServeArgs::default()),
        Some(Command::Serve(args)) => run_serve(args),
        Some(Command::Genconfig { output, force }) => cli::genconfig(output, force),
        Some(Command::Token {
            config,
            user,
            ttl,
            channels,
            info,
            secret,
        }) => cli::token(config, user, ttl, channels, info, secret),
        Some(Command::CheckConfig { config }) => cli::check_config(config),
        // The generator runs its own runtime(s) and worker processes.
        Some(Command::Bench(args)) => herald_bench::main_with_args(args),
    };
    if let Err(e) = result {
        eprintln!("herald: {e:#}");
        std::process::exit(2);
    }
}

fn run_serve(args: cli::ServeArgs) -> anyhow::Result<()> {
    // mimalloc asks for transparent huge pages on its arenas; while connections come and go,
    // it gives freed parts back and the kernel zeroes a whole 2 MiB page on the next touch.
    // Measured on a 19,000-connection ramp: ~11 % of the node's CPU in page clearing, and
    // 0.2 KiB more RSS per idle connection (docs/performance.md, "Streams on the socket, huge pages off").
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("herald: could not turn transparent huge pages off: {e}");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(cli::serve(args))
}
