//! The `distill` command line; all work is done by the library.

fn main() {
    if let Err(e) = distill::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(distill::cli::exit_code(&e));
    }
}
