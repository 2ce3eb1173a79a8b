//! `distill bench --what inference` on the tiny UNet: every student x batch x runtime has a row,
//! timed and matching candle, or a clear "missing" reason. Speed is never asserted here.

use distill::bench::inference::{self, InferenceOptions, RUNTIMES};
use distill::bench::TorchMode;

#[test]
fn tiny_inference_bench_has_every_row() {
    let o = InferenceOptions {
        config: "tiny".into(),
        batches: vec![1, 3],
        threads: Some(1),
        warmup: 0,
        iters: 1,
        torch: TorchMode::Off,
        ..Default::default()
    };
    let r = inference::run(&o).unwrap();
    let table = r.to_string();
    for student in ["dmd2_1step", "dmd2_4step"] {
        for batch in [1, 3] {
            for rt in RUNTIMES {
                let row = r
                    .rows
                    .iter()
                    .find(|x| x.student == student && x.batch == batch && x.runtime == rt)
                    .unwrap_or_else(|| panic!("no row {student} {batch} {rt}:\n{table}"));
                match row.ms {
                    Some(ms) => {
                        assert!(ms > 0.0, "{row:?}");
                        assert!(row.note.is_none(), "{row:?}");
                        assert!(row.max_abs_diff.is_some(), "{row:?}");
                    }
                    None => assert!(row.note.is_some(), "{row:?}"),
                }
            }
            // candle and tract are always there (pure Rust); PyTorch is off in tests.
            for rt in ["candle", "tract"] {
                let row = r
                    .rows
                    .iter()
                    .find(|x| x.student == student && x.batch == batch && x.runtime == rt)
                    .unwrap();
                assert!(row.ms.is_some(), "{row:?}");
            }
        }
    }
    assert!(
        table.contains("missing: PyTorch comparison turned off"),
        "{table}"
    );
    assert!(table.contains("fastest for the exported ONNX: "), "{table}");
    assert_eq!(
        table.matches("dmd2_4step batch 3: fastest").count(),
        1,
        "{table}"
    );
}
