//! The `distill` command line: flags -> jobs (`distill::jobs`) -> library.

mod cli;

use clap::Parser;

// glibc returns large freed blocks to the OS, so every activation of a training step page-faults
// fresh memory (a third of a CPU step went to clear_page). mimalloc keeps and reuses them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = cli::Cli::parse();
    distill::host::tune_allocator();
    distill::host::tune_threads(cli.threads);
    if let Err(e) = cli::run(&cli) {
        eprintln!("error: {e:#}");
        std::process::exit(distill::jobs::exit_code(&e));
    }
}
