use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    herald_bench::main_with_args(herald_bench::BenchArgs::parse())
}
