//! `ytrainer curve`: a plugin's weight as a function of the token loss (or of the normalised entropy), printed
//! as a table, CSV or JSON, and optionally drawn to SVG / PNG with plotters.
//!
//! All points are handed to the plugin as **one batch**, exactly as the trainer hands it a micro-batch; for
//! per-token plugins that is the same as evaluating each point alone, for batch-relative plugins (`rho1`,
//! `truncation`) it shows which part of the grid they keep.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use plotters::prelude::*;
use ytrainer_core::loss::{LossFn, Registry, TokenStats, tensor_from_slice, tensor_to_vec};

use crate::cli::{CurveArgs, CurveAxis, CurveFormat};

/// One plugin's curve.
struct Series {
    name: String,
    weights: Vec<f64>,
}

/// `NAME=VALUE` plugin parameters (`--param`, `--loss-param`).
pub(crate) fn parse_params(kvs: &[String]) -> Result<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    for kv in kvs {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("`{kv}`: expected NAME=VALUE, e.g. `cutoff=10`"))?;
        let x: f64 = v
            .trim()
            .parse()
            .map_err(|_| anyhow!("`{kv}`: `{v}` is not a number; plugin parameters are numeric"))?;
        m.insert(k.trim().to_string(), x);
    }
    Ok(m)
}

/// The x values: `--at`, else `points` evenly spaced from `from` to `to`.
fn grid(a: &CurveArgs) -> Result<Vec<f64>> {
    if !a.at.is_empty() {
        if let Some(x) = a.at.iter().find(|x| !x.is_finite()) {
            bail!("`--at`: {x} is not a finite number");
        }
        return Ok(a.at.clone());
    }
    if !(a.from.is_finite() && a.to.is_finite() && a.from < a.to) {
        bail!(
            "`--from {}` `--to {}`: need finite numbers with from < to",
            a.from,
            a.to
        );
    }
    if a.points < 2 || a.points > 100_000 {
        bail!("`--points {}`: must be between 2 and 100000", a.points);
    }
    let step = (a.to - a.from) / (a.points - 1) as f64;
    Ok((0..a.points).map(|i| a.from + step * i as f64).collect())
}

/// Weights of plugin `name` at the x values.
fn evaluate(
    registry: &Registry,
    name: &str,
    params: &BTreeMap<String, f64>,
    xs: &[f64],
    a: &CurveArgs,
) -> Result<Vec<f64>> {
    let (f, _) = registry.build(name, params)?;
    let LossFn::Token(p) = f else {
        bail!("`{name}` is a pairwise objective; `ytrainer curve` draws token plugins");
    };
    let device = ytrainer_core::device::select("cpu", 0).map_err(|e| anyhow!(e))?;
    let n = xs.len();
    let col = |v: f64| vec![v as f32; n];
    let xs32: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    let (loss, entropy) = match a.vs {
        CurveAxis::Loss => (xs32.clone(), col(a.entropy)),
        CurveAxis::Entropy => (col(a.loss), xs32.clone()),
    };
    let needs = p.needs();
    let mut stats = TokenStats::from_loss(tensor_from_slice(&loss, &device));
    stats.entropy = needs.entropy.then(|| tensor_from_slice(&entropy, &device));
    stats.top_k_entropy = (needs.top_k_entropy > 0).then(|| tensor_from_slice(&entropy, &device));
    stats.reference_loss = needs
        .reference_loss
        .then(|| tensor_from_slice(&col(a.reference_loss), &device));
    stats.position = needs.position.then(|| vec![0; n]);
    stats.sample = needs.sample.then(|| (0..n as u32).collect());
    let w = p
        .try_weights(&stats)
        .map_err(|e| anyhow!("computing the curve of `{name}`: {e}"))?;
    let w = tensor_to_vec(w);
    if w.len() != n {
        bail!(
            "plugin `{name}` returned {} weights for {n} points",
            w.len()
        );
    }
    Ok(w.into_iter().map(f64::from).collect())
}

/// `ytrainer curve`
pub fn curve(a: CurveArgs) -> Result<()> {
    let registry = crate::plugins_cmd::registry(&[])?;
    let params = parse_params(&a.params)?;
    let mut names: Vec<String> = a.name.iter().cloned().collect();
    for c in &a.compare {
        let c = c.trim();
        if !c.is_empty() && !names.iter().any(|n| n == c) {
            names.push(c.to_string());
        }
    }
    if names.is_empty() {
        bail!("name a plugin (`ytrainer curve nlirg`) or several with `--compare nlirg,dft,focal`");
    }
    if !params.is_empty() && a.name.is_none() {
        bail!(
            "`--param` applies to the plugin named first (`ytrainer curve NAME --param k=v`); name one"
        );
    }
    let xs = grid(&a)?;
    let mut series = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let p = if i == 0 && a.name.is_some() {
            params.clone()
        } else {
            BTreeMap::new()
        };
        series.push(Series {
            name: n.clone(),
            weights: evaluate(&registry, n, &p, &xs, &a)?,
        });
    }
    let xname = match a.vs {
        CurveAxis::Loss => "loss",
        CurveAxis::Entropy => "entropy",
    };
    print!("{}", render(&xs, &series, xname, a.format)?);
    if let Some(out) = &a.out {
        draw(out, &xs, &series, xname)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn render(xs: &[f64], series: &[Series], xname: &str, format: CurveFormat) -> Result<String> {
    let mut s = String::new();
    match format {
        CurveFormat::Json => {
            let list = |w: &[f64]| {
                serde_json::Value::Array(
                    xs.iter()
                        .zip(w)
                        .map(|(x, w)| serde_json::json!({ xname: x, "weight": w }))
                        .collect(),
                )
            };
            let v = if series.len() == 1 {
                list(&series[0].weights)
            } else {
                serde_json::Value::Object(
                    series
                        .iter()
                        .map(|c| (c.name.clone(), list(&c.weights)))
                        .collect(),
                )
            };
            s.push_str(&serde_json::to_string_pretty(&v)?);
            s.push('\n');
        }
        CurveFormat::Csv => {
            let header: Vec<String> = if series.len() == 1 {
                vec![xname.into(), "weight".into()]
            } else {
                std::iter::once(xname.to_string())
                    .chain(series.iter().map(|c| c.name.clone()))
                    .collect()
            };
            s.push_str(&header.join(","));
            s.push('\n');
            for (i, x) in xs.iter().enumerate() {
                let row: Vec<String> = std::iter::once(format!("{x}"))
                    .chain(series.iter().map(|c| format!("{}", c.weights[i])))
                    .collect();
                s.push_str(&row.join(","));
                s.push('\n');
            }
        }
        CurveFormat::Table => {
            let header: Vec<String> = if series.len() == 1 {
                vec![xname.into(), "weight".into()]
            } else {
                std::iter::once(xname.to_string())
                    .chain(series.iter().map(|c| c.name.clone()))
                    .collect()
            };
            let line = |cols: &[String]| {
                cols.iter()
                    .map(|c| format!("{c:>12}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            s.push_str(&line(&header));
            s.push('\n');
            for (i, x) in xs.iter().enumerate() {
                let row: Vec<String> = std::iter::once(format!("{x:.4}"))
                    .chain(series.iter().map(|c| format!("{:.6}", c.weights[i])))
                    .collect();
                s.push_str(&line(&row));
                s.push('\n');
            }
        }
    }
    Ok(s)
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a TrueType font for plot text (`YTRAINER_FONT` or a usual system font); false if none.
fn font_available() -> bool {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DONE.get_or_init(|| {
        let env = std::env::var("YTRAINER_FONT").ok();
        env.iter()
            .map(String::as_str)
            .chain(FONT_CANDIDATES.iter().copied())
            .any(|c| {
                std::fs::read(c).is_ok_and(|bytes| {
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
                })
            })
    })
}

const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

fn draw(out: &Path, xs: &[f64], series: &[Series], xname: &str) -> Result<()> {
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let size = (800, 500);
    match ext.as_deref() {
        Some("svg") => plot_on(
            SVGBackend::new(out, size).into_drawing_area(),
            xs,
            series,
            xname,
        ),
        Some("png") => plot_on(
            BitMapBackend::new(out, size).into_drawing_area(),
            xs,
            series,
            xname,
        ),
        _ => bail!(
            "--out {}: unsupported image type; use a file name ending in .svg or .png",
            out.display()
        ),
    }
    .with_context(|| format!("drawing {}", out.display()))
}

fn plot_on<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    xs: &[f64],
    series: &[Series],
    xname: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    let text = font_available();
    if !text {
        eprintln!(
            "warning: no TrueType font found; drawing the curve without text (set YTRAINER_FONT=/path/to/font.ttf)"
        );
    }
    root.fill(&WHITE).map_err(err)?;
    let (x0, x1) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let ymax = series
        .iter()
        .flat_map(|s| s.weights.iter().copied())
        .filter(|w| w.is_finite())
        .fold(0.0, f64::max)
        .max(1e-6)
        * 1.05;
    let mut b = ChartBuilder::on(&root);
    b.margin(15);
    if text {
        let title = series
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        b.caption(format!("weight vs {xname}: {title}"), ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(50);
    }
    let mut chart = b.build_cartesian_2d(x0..x1, 0.0..ymax).map_err(err)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(xname).y_desc("weight");
    } else {
        mesh.disable_x_mesh().disable_y_mesh();
    }
    if text {
        mesh.draw().map_err(err)?;
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = xs.iter().copied().zip(s.weights.iter().copied()).collect();
        let drawn = chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?;
        if text {
            drawn
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if text && series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
