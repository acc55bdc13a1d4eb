use clap::Parser as _;

// The node's allocator: the generator must fit beside the nodes, and with it an idle
// connection costs 1.76 KiB of its RSS instead of 1.97 with the C allocator
// (docs/performance.md, "The generator's memory").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // As on the node (herald-server's main.rs): mimalloc's huge pages cost page clearing
    // and RSS while connections come and go.
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("herald-bench: could not turn transparent huge pages off: {e}");
    }
    herald_bench::main_with_args(herald_bench::BenchArgs::parse())
}
