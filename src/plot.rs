//! Training curves as PNG line charts, drawn without a plotting library: `distill plot` reads a
//! run's `metrics.jsonl` and draws chosen keys against `step`, with axes, ticks and a legend in a
//! built-in 5x7 pixel font.

use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

/// One named curve: `(step, value)` points in step order.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Reads `keys` (every numeric key but the bookkeeping ones when empty) from a metrics file.
pub fn read_metrics(path: &Path, keys: &[String]) -> Result<Vec<Series>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out: Vec<Series> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        let obj = v
            .as_object()
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        let Some(step) = obj.get("step").and_then(|s| s.as_f64()) else {
            bail!("{}:{}: no numeric `step`", path.display(), i + 1);
        };
        for (k, val) in obj {
            let wanted = if keys.is_empty() {
                !matches!(
                    k.as_str(),
                    "step" | "elapsed_s" | "it_per_s" | "student_updates"
                ) && !k.starts_with("lr")
            } else {
                keys.iter().any(|x| x == k)
            };
            let Some(y) = val.as_f64() else { continue };
            if !wanted || !y.is_finite() {
                continue;
            }
            match out.iter_mut().find(|s| &s.name == k) {
                Some(s) => s.points.push((step, y)),
                None => out.push(Series {
                    name: k.clone(),
                    points: vec![(step, y)],
                }),
            }
        }
    }
    for k in keys {
        ensure!(
            out.iter().any(|s| &s.name == k),
            "{}: no numeric values for {k:?}",
            path.display()
        );
    }
    ensure!(!out.is_empty(), "{}: nothing to plot", path.display());
    if !keys.is_empty() {
        out.sort_by_key(|s| keys.iter().position(|k| k == &s.name));
    }
    Ok(out)
}

const W: usize = 800;
const H: usize = 480;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 30;
const BOTTOM: usize = 40;
const COLORS: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![255; W * H * 3],
        }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            self.set(x.round() as i64, y.round() as i64, c);
            self.set(x.round() as i64, y.round() as i64 + 1, c);
        }
    }
    fn text(&mut self, s: &str, x: i64, y: i64, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.set(x + 6 * i as i64 + col, y + row as i64, c);
                    }
                }
            }
        }
    }
}

/// Round tick positions covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / want as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= want as f64)
        .unwrap_or(10.0 * mag);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + 1e-9 * span {
        out.push(v);
        v += step;
    }
    out
}

/// Ticks at 1, 2 and 5 times powers of ten, in log10 units, covering `[lo, hi]` (log10 values).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let decades: Vec<f64> = (lo.floor() as i64..=hi.ceil() as i64)
        .map(|e| e as f64)
        .collect();
    let mut out: Vec<f64> = decades
        .iter()
        .copied()
        .filter(|&e| e >= lo && e <= hi)
        .collect();
    if out.len() < 3 {
        out = decades
            .iter()
            .flat_map(|&e| [e, e + 2f64.log10(), e + 5f64.log10()])
            .filter(|&v| v >= lo && v <= hi)
            .collect();
    }
    out
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Draws the series into a PNG at `path`; `log_y` plots log10 of the values (positive ones).
pub fn plot_png(path: &Path, title: &str, series: &[Series], log_y: bool) -> Result<()> {
    ensure!(!series.is_empty(), "nothing to plot");
    let tf = |y: f64| if log_y { y.log10() } else { y };
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| !log_y || p.1 > 0.0)
        .map(|(x, y)| (x, tf(y)))
        .collect();
    ensure!(
        !pts.is_empty(),
        "no plottable points (log scale needs positive values)"
    );
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let (mut y0, mut y1) = (f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 == y0 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = 0.05 * (y1 - y0);
    (y0, y1) = (y0 - pad, y1 + pad);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let sx = |x: f64| LEFT as f64 + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let mut c = Canvas::new();
    let (grey, black) = ([225, 225, 225], [0, 0, 0]);
    for t in ticks(x0, x1, 8) {
        let x = sx(t);
        c.line((x, TOP as f64), (x, (H - BOTTOM) as f64), grey);
        let s = fmt_tick(t);
        c.text(
            &s,
            x as i64 - 3 * s.len() as i64,
            (H - BOTTOM + 8) as i64,
            black,
        );
    }
    let yt = if log_y {
        log_ticks(y0, y1)
    } else {
        ticks(y0, y1, 6)
    };
    for t in yt {
        let y = sy(t);
        c.line((LEFT as f64, y), ((W - RIGHT) as f64, y), grey);
        let s = if log_y {
            fmt_tick(10f64.powf(t))
        } else {
            fmt_tick(t)
        };
        c.text(
            &s,
            LEFT as i64 - 6 * s.len() as i64 - 6,
            y as i64 - 3,
            black,
        );
    }
    let (l, r, tp, b) = (
        LEFT as f64,
        (W - RIGHT) as f64,
        TOP as f64,
        (H - BOTTOM) as f64,
    );
    c.line((l, b), (r, b), black);
    c.line((l, tp), (l, b), black);
    for (i, s) in series.iter().enumerate() {
        let col = COLORS[i % COLORS.len()];
        let p: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| !log_y || p.1 > 0.0)
            .map(|&(x, y)| (sx(x), sy(tf(y))))
            .collect();
        for w in p.windows(2) {
            c.line(w[0], w[1], col);
        }
        if p.len() == 1 {
            c.line(p[0], (p[0].0 + 2.0, p[0].1), col);
        }
        let ly = TOP as i64 + 6 + 12 * i as i64;
        let lx = (W - RIGHT) as i64 - 6 * s.name.len() as i64 - 30;
        c.line(
            (lx as f64, ly as f64 + 3.0),
            (lx as f64 + 18.0, ly as f64 + 3.0),
            col,
        );
        c.text(&s.name, lx + 22, ly, col);
    }
    c.text(title, LEFT as i64, 10, black);
    c.text(
        if log_y { "step  (log y)" } else { "step" },
        (W / 2) as i64 - 12,
        (H - 14) as i64,
        black,
    );
    write_rgb_png(path, &c.px)
}

fn write_rgb_png(path: &Path, px: &[u8]) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(px)?;
    }
    crate::checkpoint::write_atomic(path, &bytes)
}

/// 5x7 glyphs (rows top to bottom, bit 4 = leftmost pixel); unknown characters draw as '?'.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        ' ' => [0; 7],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(0.0, 100.0, 5),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        let t = ticks(0.013, 0.087, 6);
        assert!(t.len() >= 3 && t.windows(2).all(|w| w[1] > w[0]));
        assert!(t[0] >= 0.013 && *t.last().unwrap() <= 0.087);
        assert_eq!(fmt_tick(0.25), "0.25");
        assert_eq!(fmt_tick(2000.0), "2000");
        assert_eq!(fmt_tick(1e-5), "1.0e-5");
    }

    #[test]
    fn plot_reads_metrics_and_draws_each_series_in_its_colour() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("metrics.jsonl");
        let lines: String = (1..=20)
            .map(|s| {
                format!(
                    "{{\"step\":{s},\"loss_a\":{},\"loss_b\":{},\"lr\":0.1}}\n",
                    1.0 / s as f64,
                    0.5
                )
            })
            .collect();
        std::fs::write(&m, lines).unwrap();
        let all = read_metrics(&m, &[]).unwrap();
        assert_eq!(
            all.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["loss_a", "loss_b"]
        );
        let s = read_metrics(&m, &["loss_b".into()]).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].points.len(), 20);
        assert!(read_metrics(&m, &["nope".into()])
            .unwrap_err()
            .to_string()
            .contains("nope"));
        let png = dir.path().join("c.png");
        plot_png(&png, "test", &all, true).unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        r.next_frame(&mut buf).unwrap();
        let count = |c: [u8; 3]| buf.chunks(3).filter(|p| *p == c).count();
        assert!(
            count(COLORS[0]) > 200 && count(COLORS[1]) > 200,
            "both curves drawn"
        );
        std::fs::write(&m, "{\"step\": 1, \"x\": 1}\nnot json\n").unwrap();
        assert!(read_metrics(&m, &[])
            .unwrap_err()
            .to_string()
            .contains(":2"));
    }
}
