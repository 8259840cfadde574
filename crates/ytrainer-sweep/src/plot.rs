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

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing `{}`: {e:?}", p.title);
    let pts = || p.lines.iter().flat_map(|l| l.points.iter());
    let (x0, x1) = range(pts().map(|p| p.0), p.scatter);
    let (y0, y1) = range(pts().map(|p| p.1), p.scatter);
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(&p.x)
        .y_desc(&p.y)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()
        .map_err(err)?;
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
            },
            Panel {
                title: "eval loss (the run's eval set)".into(),
                x: "optimizer step".into(),
                y: "mean token CE".into(),
                lines: lines("eval_loss", true),
                scatter: false,
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
        })
        .collect();
    if !zone_panels.is_empty() {
        files.extend(draw(&zone_panels, 2, &dir.join("zones"))?);
    }
    Ok(files)
}
