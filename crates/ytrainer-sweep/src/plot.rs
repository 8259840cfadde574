//! Plots (PNG and SVG via plotters): a run's curves, and a sweep's training curves per strategy,
//! learning-vs-forgetting scatter and NLIRG zone fractions over time.
//!
//! Text needs a TrueType font: `YTRAINER_FONT=/path/to/font.ttf`, or the first of a few usual system fonts
//! (DejaVu Sans, Liberation Sans, Arial).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{Map, Value};

use crate::results::TrialResult;

const FONT: &str = "sans-serif";

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

fn ensure_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let env = std::env::var("YTRAINER_FONT").ok();
        let candidates = env.iter().map(String::as_str).chain(FONT_CANDIDATES.iter().copied());
        for c in candidates {
            if let Ok(bytes) = fs::read(c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err("no TrueType font found for plot text; set YTRAINER_FONT=/path/to/font.ttf (e.g. DejaVuSans.ttf)"
            .to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Reads a JSONL file into objects (missing file: empty; bad lines are skipped).
pub fn read_jsonl(path: &Path) -> Vec<Map<String, Value>> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .collect()
}

/// `(step, row[key])` for every row that has both as numbers.
pub fn series(rows: &[Map<String, Value>], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

/// One line (or point set) of a panel.
#[derive(Debug, Clone)]
pub struct Line {
    /// Legend label (repeated labels are listed once).
    pub label: String,
    /// Palette index.
    pub color: usize,
    /// Points.
    pub points: Vec<(f64, f64)>,
}

/// One chart.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption.
    pub title: String,
    /// X axis description.
    pub x: String,
    /// Y axis description.
    pub y: String,
    /// Lines.
    pub lines: Vec<Line>,
    /// Draw points instead of lines.
    pub scatter: bool,
    /// The x axis counts something whole (optimizer steps): ticks only at integers.
    pub integer_x: bool,
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

fn range(vals: impl Iterator<Item = f64>, include_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if include_zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

/// An integer axis over `lo..=hi`: at least half a unit of room on each side, and at most as many labels as
/// there are whole numbers in the range, so that plotters' tick step (1, 2, 5 x 10^k) is never below 1 and
/// every tick is a whole number (no step 2.5). Returns the range and the label count.
fn integer_axis(lo: f64, hi: f64) -> (f64, f64, usize) {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    let pad = ((hi - lo) * 0.05).max(0.5);
    let (x0, x1) = (lo - pad, hi + pad);
    let whole = (x1.floor() - x0.ceil()) as usize + 1;
    (x0, x1, whole.clamp(1, 10))
}

/// Pixels one legend row takes (13 px text plus spacing) and the legend box's own border and padding.
const LEGEND_ROW_PX: f64 = 20.0;
const LEGEND_PAD_PX: f64 = 14.0;

/// How far to raise the top of the y range, as a fraction of the data's span, so that a legend of `rows` rows in
/// the upper right corner of a plot `plot_px` pixels high lies above every point and covers none.
fn legend_headroom(plot_px: f64, rows: usize) -> f64 {
    if rows == 0 {
        return 0.0;
    }
    let legend = LEGEND_PAD_PX + LEGEND_ROW_PX * rows as f64;
    // The legend's share of the plot height, kept below 60% so the data keep most of the panel.
    let share = (legend / plot_px.max(1.0)).min(0.6);
    share / (1.0 - share)
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing `{}`: {e:?}", p.title);
    let pts = || p.lines.iter().flat_map(|l| l.points.iter());
    let (mut x0, mut x1) = range(pts().map(|p| p.0), p.scatter);
    let mut x_labels = 10;
    if p.integer_x {
        let lo = pts().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let hi = pts().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        (x0, x1, x_labels) = integer_axis(lo, hi);
    }
    let (y0, mut y1) = range(pts().map(|p| p.1), p.scatter);
    let mut labels: Vec<&str> = Vec::new();
    for l in &p.lines {
        if !l.label.is_empty() && !labels.contains(&l.label.as_str()) {
            labels.push(&l.label);
        }
    }
    // Room above the data for the legend: margins, caption and the x label area are not plot height.
    let plot_px = area.dim_in_pixel().1 as f64 - 2.0 * 12.0 - 40.0 - 30.0;
    y1 += (y1 - y0) * legend_headroom(plot_px, labels.len());
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    let whole = |x: &f64| format!("{x:.0}");
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(&p.x)
        .y_desc(&p.y)
        .x_labels(x_labels)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14));
    if p.integer_x {
        mesh.x_label_formatter(&whole);
    }
    mesh.draw().map_err(err)?;
    let mut labelled: Vec<String> = Vec::new();
    for l in &p.lines {
        let c = color(l.color);
        let anno = if p.scatter {
            chart
                .draw_series(
                    l.points
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 5, c.filled())),
                )
                .map_err(err)?
        } else {
            chart
                .draw_series(LineSeries::new(l.points.iter().copied(), c.stroke_width(2)))
                .map_err(err)?
        };
        if !l.label.is_empty() && !labelled.contains(&l.label) {
            labelled.push(l.label.clone());
            anno.label(l.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
            });
        }
    }
    if !labelled.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

fn draw_all<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    panels: &[Panel],
    cols: usize,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let rows = panels.len().div_ceil(cols);
    let areas = root.split_evenly((rows, cols));
    for (a, p) in areas.iter().zip(panels) {
        draw_panel(a, p)?;
    }
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// Draws `panels` in a grid of `cols` columns to `<base>.png` and `<base>.svg`; returns both paths.
pub fn draw(panels: &[Panel], cols: usize, base: &Path) -> Result<Vec<PathBuf>> {
    ensure_font()?;
    let cols = cols.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let size = (560 * cols as u32, 400 * rows as u32);
    let png = base.with_extension("png");
    let svg = base.with_extension("svg");
    draw_all(
        BitMapBackend::new(&png, size).into_drawing_area(),
        panels,
        cols,
    )?;
    draw_all(
        SVGBackend::new(&svg, size).into_drawing_area(),
        panels,
        cols,
    )?;
    Ok(vec![png, svg])
}

const ZONES: [(&str, &str); 4] = [
    ("zone_learned", "learned"),
    ("zone_learning", "learning"),
    ("zone_hard", "hard"),
    ("zone_noise", "noise"),
];

/// `ytrainer plot RUN_DIR`: loss/CE, eval loss, zone fractions, learning rate, gradient norm, token accuracy;
/// written to `RUN_DIR/plots/curves.{png,svg}`.
pub fn run_plots(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let m = read_jsonl(&run_dir.join("metrics.jsonl"));
    if m.is_empty() {
        return Err(anyhow!(
            "{}: no metrics.jsonl with steps; pass a run directory written by `ytrainer run`",
            run_dir.display()
        ));
    }
    let e = read_jsonl(&run_dir.join("eval.jsonl"));
    let line = |label: &str, color, points| Line {
        label: label.into(),
        color,
        points,
    };
    let panel = |title: &str, y: &str, lines| Panel {
        title: title.into(),
        x: "optimizer step".into(),
        y: y.into(),
        lines,
        scatter: false,
        integer_x: true,
    };
    let panels = vec![
        panel(
            "training loss",
            "loss",
            vec![
                line("optimised loss", 0, series(&m, "loss")),
                line("raw CE", 1, series(&m, "ce")),
            ],
        ),
        panel(
            "eval loss",
            "mean token CE",
            vec![line("eval", 2, series(&e, "eval_loss"))],
        ),
        panel(
            "token zones (fraction of supervised tokens)",
            "fraction",
            ZONES
                .iter()
                .enumerate()
                .map(|(i, (k, l))| line(l, i, series(&m, k)))
                .collect(),
        ),
        panel("learning rate", "lr", vec![line("", 0, series(&m, "lr"))]),
        panel(
            "gradient norm (before clipping)",
            "norm",
            vec![line("", 3, series(&m, "grad_norm"))],
        ),
        panel(
            "token accuracy",
            "accuracy",
            vec![
                line("train", 0, series(&m, "token_accuracy")),
                line("eval", 2, series(&e, "eval_token_accuracy")),
            ],
        ),
    ];
    let dir = run_dir.join("plots");
    fs::create_dir_all(&dir)?;
    draw(&panels, 2, &dir.join("curves"))
}

/// Mean of several `(step, value)` series, step by step (steps missing in some series use the others).
fn mean_series(all: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let mut acc: std::collections::BTreeMap<i64, (f64, usize)> = Default::default();
    for s in all {
        for &(x, y) in s {
            let e = acc.entry(x.round() as i64).or_insert((0.0, 0));
            e.0 += y;
            e.1 += 1;
        }
    }
    acc.into_iter()
        .map(|(x, (s, n))| (x as f64, s / n as f64))
        .collect()
}

/// The sweep's plots in `<out>/plots/`: `curves` (train CE and the run's eval loss per trial, coloured by
/// strategy), `forgetting` (domain gain vs general-loss increase per trial), `zones` (zone fractions per
/// strategy, mean over seeds).
pub fn sweep_plots(out: &Path, results: &[TrialResult]) -> Result<Vec<PathBuf>> {
    let mut strategies: Vec<&str> = Vec::new();
    for r in results {
        if !strategies.contains(&r.strategy.as_str()) {
            strategies.push(&r.strategy);
        }
    }
    let ci = |s: &str| strategies.iter().position(|x| *x == s).unwrap_or(0);
    type Rows = Vec<Map<String, Value>>;
    let metrics: Vec<(usize, Rows, Rows)> = results
        .iter()
        .map(|r| {
            let d = out.join("trials").join(&r.id);
            (
                ci(&r.strategy),
                read_jsonl(&d.join("metrics.jsonl")),
                read_jsonl(&d.join("eval.jsonl")),
            )
        })
        .collect();
    let dir = out.join("plots");
    fs::create_dir_all(&dir)?;
    let mut files = Vec::new();
    let lines = |key: &str, eval: bool| -> Vec<Line> {
        metrics
            .iter()
            .map(|(c, m, e)| Line {
                label: strategies[*c].to_string(),
                color: *c,
                points: series(if eval { e } else { m }, key),
            })
            .collect()
    };
    files.extend(draw(
        &[
            Panel {
                title: "training CE per trial".into(),
                x: "optimizer step".into(),
                y: "raw CE of the step's tokens".into(),
                lines: lines("ce", false),
                scatter: false,
                integer_x: true,
            },
            Panel {
                title: "eval loss (the run's eval set)".into(),
                x: "optimizer step".into(),
                y: "mean token CE".into(),
                lines: lines("eval_loss", true),
                scatter: false,
                integer_x: true,
            },
        ],
        2,
        &dir.join("curves"),
    )?);
    files.extend(draw(
        &[Panel {
            title: "learning vs forgetting (one point per trial)".into(),
            x: "general loss increase (forgetting)".into(),
            y: "domain loss gain (learning)".into(),
            lines: results
                .iter()
                .map(|r| Line {
                    label: r.strategy.clone(),
                    color: ci(&r.strategy),
                    points: vec![(r.forgetting(), r.gain())],
                })
                .collect(),
            scatter: true,
            integer_x: false,
        }],
        1,
        &dir.join("forgetting"),
    )?);
    let zone_panels: Vec<Panel> = strategies
        .iter()
        .enumerate()
        .map(|(si, s)| Panel {
            title: format!("token zones: {s}"),
            x: "optimizer step".into(),
            y: "fraction of supervised tokens".into(),
            lines: ZONES
                .iter()
                .enumerate()
                .map(|(zi, (k, l))| Line {
                    label: l.to_string(),
                    color: zi,
                    points: mean_series(
                        &metrics
                            .iter()
                            .filter(|(c, _, _)| *c == si)
                            .map(|(_, m, _)| series(m, k))
                            .collect::<Vec<_>>(),
                    ),
                })
                .collect(),
            scatter: false,
            integer_x: true,
        })
        .collect();
    if !zone_panels.is_empty() {
        files.extend(draw(&zone_panels, 2, &dir.join("zones"))?);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::coord::ranged1d::Ranged;
    use plotters::coord::types::RangedCoordf64;

    /// Step axes of 1, 2, 3, 6, 12, 40 and 400 steps get whole-number ticks only (plotters' own tick choice on
    /// the range and label count `integer_axis` gives), and always at least one.
    #[test]
    fn step_axes_tick_at_whole_numbers() {
        for (lo, hi) in [
            (1.0, 1.0),
            (1.0, 2.0),
            (1.0, 3.0),
            (0.0, 6.0),
            (1.0, 12.0),
            (3.0, 40.0),
            (1.0, 400.0),
        ] {
            let (x0, x1, n) = integer_axis(lo, hi);
            assert!(x0 < lo && x1 > hi);
            let ticks = RangedCoordf64::from(x0..x1).key_points(n);
            assert!(!ticks.is_empty(), "{lo}..{hi}");
            for t in &ticks {
                assert_eq!(t.fract(), 0.0, "{lo}..{hi}: tick {t} in {ticks:?}");
            }
        }
        // the old axis of a 3-step run: 0.9..3.1 with 10 labels ticks every half step or less
        let old = RangedCoordf64::from(0.9..3.1).key_points(10);
        assert!(old.iter().any(|t| t.fract() != 0.0), "{old:?}");
    }

    /// The legend's rows fit in the band added above the data: the band is at least the legend's height.
    #[test]
    fn the_legend_gets_a_band_above_the_data() {
        assert_eq!(legend_headroom(300.0, 0), 0.0);
        for rows in 1..=6 {
            let h = legend_headroom(300.0, rows);
            // the band's share of the raised range, in pixels
            let band_px = 300.0 * h / (1.0 + h);
            assert!(
                band_px + 1e-9 >= (LEGEND_PAD_PX + LEGEND_ROW_PX * rows as f64).min(180.0),
                "{rows} rows: {band_px} px"
            );
        }
    }

    /// A run's curves draw with integer step ticks and named legends (`token zones`: learned, learning, ...).
    #[test]
    fn run_plots_label_steps_with_whole_numbers() {
        if ensure_font().is_err() {
            eprintln!("no TrueType font on this machine: plot text not checked");
            return;
        }
        let dir = std::env::temp_dir().join(format!("ytrainer-plot-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut m = String::new();
        for step in 1..=3 {
            m.push_str(&format!(
                "{{\"step\":{step},\"loss\":{},\"ce\":{},\"zone_learned\":0.1,\"zone_learning\":0.5,\
                 \"zone_hard\":0.3,\"zone_noise\":0.1,\"lr\":0.001,\"grad_norm\":1.0,\"token_accuracy\":0.5}}\n",
                // far from the step numbers, so that no y tick reads like a half step
                300 - 10 * step,
                350 - 10 * step
            ));
        }
        fs::write(dir.join("metrics.jsonl"), m).unwrap();
        let files = run_plots(&dir).unwrap();
        let svg = fs::read_to_string(
            files
                .iter()
                .find(|f| f.extension().unwrap() == "svg")
                .unwrap(),
        )
        .unwrap();
        // plotters writes each text on a line of its own
        let text = |t: &str| format!(">\n{t}\n</text>");
        for name in [
            "optimised loss",
            "raw CE",
            "learned",
            "learning",
            "hard",
            "noise",
        ] {
            assert!(svg.contains(&text(name)), "legend lacks {name}");
        }
        for step in ["1", "2", "3"] {
            assert!(svg.contains(&text(step)), "no tick at step {step}");
        }
        for half in ["1.5", "2.5"] {
            assert!(!svg.contains(&text(half)), "a step tick at {half}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
