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
    let timeout = std::time::Duration::from_secs_f64(cli.collective_timeout);
    let res = cli::gpu_ordinal(&cli.device)
        .and_then(|gpu| distill::parallel::init_with(timeout, gpu))
        .and_then(|_| cli::run(&cli));
    if let Err(e) = res {
        let world = distill::parallel::current();
        if let Some(world) = world.filter(|w| w.world_size() > 1) {
            // One write: the ranks' errors arrive together, and mpirun would interleave the
            // pieces of several writes.
            let line = format!(
                "error (rank {} of {}): {e:#}\n",
                world.rank(),
                world.world_size()
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            // An agreed stop: the others learn it in their next collective and stop too (no
            // rank is killed mid-checkpoint). Without it (a rank died or hangs) abort them all.
            let agreed =
                distill::parallel::is_peer_stop(&e) || world.stop(&format!("{e:#}")).is_ok();
            if agreed {
                world.finish();
            } else {
                world.abort(distill::jobs::exit_code(&e));
            }
        } else {
            eprintln!("error: {e:#}");
        }
        std::process::exit(distill::jobs::exit_code(&e));
    }
    if let Some(w) = distill::parallel::current() {
        w.finish();
    }
}
