//! The application layer: one plain job type per command, with real `Default`s and a `run`. The
//! CLI only converts its flags into these; the pipeline and the tests build them directly. Jobs
//! call the trainers (`crate::train`), the networks (`graphs`) and the exporter (`export`).

pub mod export;
mod failure;
pub mod pipeline;
pub mod sample;
pub mod train;
pub mod validate;

pub use export::{ExportJob, ExportWhat, TrtBuild};
pub use failure::{exit_code, Failure};
pub use pipeline::PipelineJob;
pub use sample::{eval_checkpoint, evaluator, EvalJob, SampleJob, SamplerOverride};
pub use train::{load_data, read_config, Dmd2Job, TdmJob, TeacherJob};
pub use validate::ValidateJob;
