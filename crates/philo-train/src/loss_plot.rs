//! The loss curve of a fine-tune as a PNG, drawn from its `metrics.jsonl`.
//!
//! Everything is pure Rust: plotters rasterises into an RGB buffer, ab_glyph draws the text
//! with Noto Sans Regular (Apache-2.0, embedded through the `ttf-noto-sans` crate, about
//! 200 KB), and `png` encodes the buffer. No system font or image library is needed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Size of the picture in pixels.
const WIDTH: u32 = 1000;
const HEIGHT: u32 = 600;
/// Training loss: a blue line.
const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
/// Eval loss: orange points joined by a thinner line.
const EVAL_COLOR: RGBColor = RGBColor(230, 97, 1);
/// The family every piece of text uses; registered from the embedded font.
const FONT: &str = "sans-serif";

/// Why the loss plot could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LossPlotError {
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: no metrics to plot (the file has no lines with a step and a loss)", path.display())]
    Empty { path: PathBuf },
    #[error("{}: drawing the loss plot failed: {message}", path.display())]
    Draw { path: PathBuf, message: String },
}

/// One step of the curve: the training loss and, where it was measured, the eval loss.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    loss: f64,
    eval_loss: Option<f64>,
}

/// Reads `metrics_jsonl` (one JSON object a line with an integer `step`, a number `loss` and
/// optionally a number `eval_loss`; other fields are ignored, blank lines skipped) and writes
/// the training loss against the step as a line, and the eval loss as points joined by a line
/// in a second colour, with axes, tick labels, axis titles and a legend, to `png`.
///
/// A step logged more than once (a resumed run appends to the same file) is drawn with its
/// last record.
pub fn write_loss_plot(metrics_jsonl: &Path, png: &Path) -> Result<(), LossPlotError> {
    let points = read_metrics(metrics_jsonl)?;
    let rgb = render(&points).map_err(|message| LossPlotError::Draw {
        path: png.to_path_buf(),
        message,
    })?;
    write_png(png, &rgb)
}

fn read_metrics(path: &Path) -> Result<BTreeMap<u64, Point>, LossPlotError> {
    let io = |cause| LossPlotError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let file = File::open(path).map_err(io)?;
    let mut points = BTreeMap::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let (step, point) = parse_line(&line).map_err(|message| LossPlotError::Malformed {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        })?;
        points.insert(step, point);
    }
    if points.is_empty() {
        return Err(LossPlotError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(points)
}

fn parse_line(line: &str) -> Result<(u64, Point), String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("expected a JSON object")?;
    let step = match object.get("step") {
        None => return Err("no \"step\"".into()),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("\"step\" is {v}, not a non-negative integer"))?,
    };
    let number = |key: &str, v: &serde_json::Value| match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(format!("\"{key}\" is {v}, not a finite number")),
    };
    let loss = match object.get("loss") {
        None => return Err("no \"loss\"".into()),
        Some(v) => number("loss", v)?,
    };
    let eval_loss = match object.get("eval_loss") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(number("eval_loss", v)?),
    };
    Ok((step, Point { loss, eval_loss }))
}

/// Registers the embedded font under [`FONT`] once per process.
fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| register_font(FONT, FontStyle::Normal, ttf_noto_sans::REGULAR).is_ok());
    if ok {
        Ok(())
    } else {
        Err("the embedded font could not be loaded".into())
    }
}

/// The axis range of `lo..=hi` with a margin, never empty.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else {
        (lo.abs() * 0.05).max(0.05)
    };
    (lo - pad, hi + pad)
}

/// Draws the chart into a `WIDTH` x `HEIGHT` RGB buffer.
fn render(points: &BTreeMap<u64, Point>) -> Result<Vec<u8>, String> {
    ensure_font()?;
    let train: Vec<(u64, f64)> = points.iter().map(|(&s, p)| (s, p.loss)).collect();
    let eval: Vec<(u64, f64)> = points
        .iter()
        .filter_map(|(&s, p)| p.eval_loss.map(|e| (s, e)))
        .collect();
    let first = *points.keys().next().expect("points are not empty");
    let last = *points.keys().next_back().expect("points are not empty");
    // A little room either side so that end points (and their markers) are not cut off.
    let x_pad = ((last - first) / 40).max(1);
    let (x_lo, x_hi) = (first.saturating_sub(x_pad), last.saturating_add(x_pad));
    let (y_min, y_max) = train
        .iter()
        .chain(&eval)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, y)| {
            (lo.min(y), hi.max(y))
        });
    let (y_lo, y_hi) = padded(y_min, y_max);
    // Enough decimals that about ten ticks over the range read apart.
    let decimals = (-((y_hi - y_lo) / 10.0).log10().floor()).clamp(0.0, 8.0) as usize;

    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Fine-tuning loss", (FONT, 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(210, 210, 210))
            .x_desc("step")
            .y_desc("loss")
            .axis_desc_style((FONT, 18))
            .label_style((FONT, 14))
            .y_label_formatter(&|v| format!("{v:.decimals$}"))
            .draw()
            .map_err(|e| e.to_string())?;

        chart
            .draw_series(LineSeries::new(
                train.iter().copied(),
                TRAIN_COLOR.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label("train loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], TRAIN_COLOR.stroke_width(2)));
        if let [only] = train[..] {
            // A line through one point draws nothing: mark it.
            chart
                .draw_series(std::iter::once(Circle::new(only, 4, TRAIN_COLOR.filled())))
                .map_err(|e| e.to_string())?;
        }
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    eval.iter().copied(),
                    EVAL_COLOR.stroke_width(1),
                ))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(eval.iter().map(|&p| Circle::new(p, 4, EVAL_COLOR.filled())))
                .map_err(|e| e.to_string())?
                .label("eval loss")
                .legend(|(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new([(0, 0), (24, 0)], EVAL_COLOR.stroke_width(1))
                        + Circle::new((12, 0), 4, EVAL_COLOR.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(rgb)
}

fn write_png(path: &Path, rgb: &[u8]) -> Result<(), LossPlotError> {
    let file = File::create(path).map_err(|cause| LossPlotError::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    let encode = |e: png::EncodingError| match e {
        png::EncodingError::IoError(cause) => LossPlotError::Io {
            path: path.to_path_buf(),
            cause,
        },
        e => LossPlotError::Draw {
            path: path.to_path_buf(),
            message: format!("PNG encoding: {e}"),
        },
    };
    let mut encoder = png::Encoder::new(BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(encode)?;
    writer.write_image_data(rgb).map_err(encode)?;
    writer.finish().map_err(encode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn metrics_file(lines: &[&str]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for line in lines {
            writeln!(f, "{line}").unwrap();
        }
        f.flush().unwrap();
        f
    }

    /// Decodes a PNG into (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(BufReader::new(File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn count(rgb: &[u8], color: RGBColor) -> usize {
        count_in(rgb, 0..WIDTH, 0..HEIGHT, |p| {
            p == [color.0, color.1, color.2]
        })
    }

    /// Pixels in columns `xs` and rows `ys` whose RGB satisfies `keep`.
    fn count_in(
        rgb: &[u8],
        xs: std::ops::Range<u32>,
        ys: std::ops::Range<u32>,
        keep: impl Fn([u8; 3]) -> bool,
    ) -> usize {
        ys.flat_map(|y| xs.clone().map(move |x| ((y * WIDTH + x) * 3) as usize))
            .filter(|&i| keep([rgb[i], rgb[i + 1], rgb[i + 2]]))
            .count()
    }

    /// Black or anti-aliased grey: what text is drawn with (grid lines are lighter).
    fn ink(p: [u8; 3]) -> bool {
        p[0] == p[1] && p[1] == p[2] && p[0] < 200
    }

    fn sample_lines() -> Vec<String> {
        (1..=50)
            .map(|step| {
                let loss = 2.5 * (-(step as f64) / 15.0).exp() + 0.4;
                let extra = if step % 10 == 0 {
                    format!(r#","eval_loss":{}"#, loss + 0.1)
                } else {
                    String::new()
                };
                format!(r#"{{"step":{step},"epoch":0.1,"loss":{loss},"lr":0.0002,"peak_memory_gib":null{extra}}}"#)
            })
            .collect()
    }

    #[test]
    fn draws_train_and_eval_curves() {
        let lines = sample_lines();
        let metrics = metrics_file(&lines.iter().map(String::as_str).collect::<Vec<_>>());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("loss.png");
        write_loss_plot(metrics.path(), &out).unwrap();
        assert!(out.is_file());
        let (w, h, rgb) = decode(&out);
        assert_eq!((w, h), (WIDTH, HEIGHT));
        assert!(
            count(&rgb, TRAIN_COLOR) > 300,
            "train line: {}",
            count(&rgb, TRAIN_COLOR)
        );
        assert!(
            count(&rgb, EVAL_COLOR) > 100,
            "eval points: {}",
            count(&rgb, EVAL_COLOR)
        );
        // Mostly white background.
        assert!(count(&rgb, WHITE) > (w * h) as usize / 2);
        // The train line in the lower half, away from the legend in the upper right.
        let lower = count_in(&rgb, 0..WIDTH, HEIGHT / 2..HEIGHT, |p| p == [31, 119, 180]);
        assert!(lower > 200, "train line in the lower half: {lower}");
    }

    #[test]
    fn text_is_rendered() {
        // Text comes from the embedded font through ab_glyph (plotters fails on a font it
        // cannot find), so ink where only text is drawn shows the font works.
        let metrics = metrics_file(&[r#"{"step":1,"loss":2.0}"#, r#"{"step":2,"loss":1.0}"#]);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("loss.png");
        write_loss_plot(metrics.path(), &out).unwrap();
        let (_, _, rgb) = decode(&out);
        // The caption above the plot.
        let caption = count_in(&rgb, 0..WIDTH, 0..40, ink);
        // The y tick labels and the "loss" title, left of the y axis.
        let left = count_in(&rgb, 0..60, 40..HEIGHT - 60, ink);
        // The "step" title below the x tick labels.
        let bottom = count_in(&rgb, 100..WIDTH, HEIGHT - 40..HEIGHT, ink);
        // The legend's text, right of its samples (inside its border).
        let legend = count_in(&rgb, WIDTH - 90..WIDTH - 25, 55..75, ink);
        for (what, n) in [
            ("caption", caption),
            ("left", left),
            ("bottom", bottom),
            ("legend", legend),
        ] {
            assert!(n > 30, "{what}: {n} text pixels");
        }
        // Anti-aliased glyph edges leave grey between black and white.
        let grey = count_in(&rgb, 0..WIDTH, 0..HEIGHT, |p| ink(p) && p[0] > 60);
        assert!(grey > 200, "grey (anti-aliased text) pixels: {grey}");
        assert_eq!(count(&rgb, EVAL_COLOR), 0, "no eval loss, no eval colour");
    }

    #[test]
    fn single_point_and_duplicate_steps() {
        // One step only: the axes still have a non-empty range.
        let metrics = metrics_file(&[r#"{"step":7,"loss":1.25,"eval_loss":1.5}"#]);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("loss.png");
        write_loss_plot(metrics.path(), &out).unwrap();
        let (_, _, rgb) = decode(&out);
        assert!(count(&rgb, EVAL_COLOR) > 20);
        // The lone train point gets a marker (the legend's sample is in the upper half).
        let marker = count_in(&rgb, 0..WIDTH, HEIGHT / 2..HEIGHT, |p| p == [31, 119, 180]);
        assert!(marker > 20, "train marker: {marker}");

        // A resumed run appends steps again: the last record of a step wins.
        let metrics = metrics_file(&[
            r#"{"step":1,"loss":3.0}"#,
            r#"{"step":2,"loss":2.0}"#,
            "",
            r#"{"step":2,"loss":2.5}"#,
            r#"{"step":3,"loss":1.0}"#,
        ]);
        let points = read_metrics(metrics.path()).unwrap();
        assert_eq!(points.len(), 3);
        assert_eq!(points[&2].loss, 2.5);
        assert_eq!(points[&2].eval_loss, None);
    }

    fn error_of(lines: &[&str]) -> (LossPlotError, PathBuf) {
        let metrics = metrics_file(lines);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("loss.png");
        let err = write_loss_plot(metrics.path(), &out).unwrap_err();
        assert!(!out.exists(), "no PNG on error");
        (err, metrics.path().to_path_buf())
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let good = r#"{"step":1,"loss":2.0}"#;
        for (bad, needle) in [
            ("{not json", "not JSON"),
            ("[1, 2.0]", "expected a JSON object"),
            (r#"{"loss":2.0}"#, "no \"step\""),
            (r#"{"step":1.5,"loss":2.0}"#, "\"step\" is 1.5"),
            (r#"{"step":-3,"loss":2.0}"#, "\"step\" is -3"),
            (r#"{"step":2}"#, "no \"loss\""),
            (r#"{"step":2,"loss":null}"#, "\"loss\" is null"),
            (r#"{"step":2,"loss":"0.5"}"#, "\"loss\" is \"0.5\""),
            (
                r#"{"step":2,"loss":1.0,"eval_loss":"x"}"#,
                "\"eval_loss\" is \"x\"",
            ),
        ] {
            let (err, path) = error_of(&[good, "", bad, good]);
            assert!(
                matches!(&err, LossPlotError::Malformed { line: 3, .. }),
                "{bad}: {err:?}"
            );
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("{}:3: ", path.display())),
                "{text}"
            );
            assert!(text.contains(needle), "{bad}: {text}");
        }
    }

    #[test]
    fn empty_and_missing_files() {
        let (err, path) = error_of(&[]);
        assert!(matches!(err, LossPlotError::Empty { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&path.display().to_string()));
        assert!(err.to_string().contains("no metrics to plot"));

        let (err, _) = error_of(&["", "   "]);
        assert!(matches!(err, LossPlotError::Empty { .. }), "{err:?}");

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("metrics.jsonl");
        let err = write_loss_plot(&missing, &dir.path().join("loss.png")).unwrap_err();
        assert!(matches!(err, LossPlotError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("metrics.jsonl"));
    }

    #[test]
    fn unwritable_png_is_an_io_error() {
        let metrics = metrics_file(&[r#"{"step":1,"loss":2.0}"#]);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("no-such-dir").join("loss.png");
        let err = write_loss_plot(metrics.path(), &out).unwrap_err();
        assert!(matches!(err, LossPlotError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-dir"));
    }
}
