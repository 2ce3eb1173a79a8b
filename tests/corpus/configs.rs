//! Malformed TOML configs.

use super::*;

#[test]
fn toml_configs_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let toml = |name: &str, body: &str, code: i32, needles: &[&str]| {
        let path = d.path().join(format!("{}.toml", name.replace(' ', "_")));
        std::fs::write(&path, body).unwrap();
        let a = s(&[
            "train",
            "teacher",
            "--config",
            &p(&path),
            "--out",
            &p(&out),
            "--limit",
            "8",
            "--sample-every",
            "0",
        ]);
        Case::new(name, a, code, needles).keep(d.path())
    };
    assert_cases(vec![
        toml(
            "unknown field",
            "stepz = 3\n",
            1,
            &["unknown field", "stepz"],
        ),
        toml("syntax error", "train_steps = = 3\n", 1, &["parsing"]),
        toml("cfg nan", "cfg_scale = nan\n", 1, &["cfg_scale"]),
        toml(
            "negative train_steps",
            "train_steps = -5\n",
            1,
            &["parsing"],
        ),
        toml(
            "both train_steps and its old name",
            "train_steps = 3\nsteps = 3\n",
            1,
            &["duplicate field", "train_steps"],
        ),
        toml("lr inf", "[optim]\nlr = inf\n", 1, &["optim.lr"]),
        toml(
            "huge resolution",
            "[model]\nresolution = 100000\n",
            1,
            &["model.resolution"],
        ),
        toml(
            "unknown parameterisation",
            "parameterisation = \"foo\"\n",
            1,
            &["parameterisation"],
        ),
        toml(
            "empty channel_mult",
            "[model]\nchannel_mult = []\n",
            1,
            &["channel_mult"],
        ),
        toml(
            "beta1 above 1",
            "[optim]\nbeta1 = 1.5\n",
            1,
            &["optim.beta1"],
        ),
        Case::new(
            "missing config file",
            s(&[
                "train",
                "teacher",
                "--config",
                "/nonexistent/run.toml",
                "--out",
                &p(&out),
            ]),
            1,
            &["/nonexistent/run.toml"],
        ),
    ]);
    // A partial [model] table fills the rest from the defaults and trains; a config with the
    // deprecated `steps` still trains, with a note naming the new key.
    for (steps_key, note) in [("train_steps", false), ("steps", true)] {
        let path = d.path().join(format!("partial_{steps_key}.toml"));
        std::fs::write(
            &path,
            format!("{steps_key} = 1\nbatch_size = 2\n[model]\nbase_channels = 8\nresolution = 16\nchannel_mult = [1, 2]\nattn_resolutions = []\n"),
        )
        .unwrap();
        let o = run(
            &s(&[
                "train",
                "teacher",
                "--config",
                &p(&path),
                "--out",
                &p(&out.join(steps_key)),
                "--limit",
                "4",
                "--sample-every",
                "0",
            ]),
            &[],
        );
        assert!(o.status.success(), "partial [model] table: {}", text(&o));
        let deprecated = text(&o).contains("`steps` is deprecated, use `train_steps`");
        assert_eq!(deprecated, note, "{}", text(&o));
    }
}
