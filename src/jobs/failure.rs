//! The outcomes a caller branches on (beyond "it failed"), and their process exit codes.

/// A job ran to its end and its verdict was negative (as opposed to an error that stopped it).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A parity check ran and is past tolerance.
    #[error("{0}")]
    ValidationFailed(String),
    /// The TensorRT compatibility lint found violations.
    #[error(transparent)]
    LintFailed(#[from] export::tensorrt::LintFailed),
}

impl Failure {
    /// The process exit code of this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::ValidationFailed(_) => 3,
            Failure::LintFailed(_) => 4,
        }
    }
}

/// Exit codes, the one place they are decided: 0 success, 1 error, 2 usage (clap), 3 validation
/// failed past tolerance, 4 the TensorRT compatibility lint failed.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if let Some(f) = e.downcast_ref::<Failure>() {
        f.exit_code()
    } else if e.downcast_ref::<export::tensorrt::LintFailed>().is_some() {
        // The export crate's own lint error, reached without being wrapped.
        4
    } else {
        1
    }
}
