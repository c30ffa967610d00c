//! SVG plots (plotters, SVG backend only: no font files or system libraries needed).

use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::Path;

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points }
    }
}

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("plot {what}: {err}")
}

/// The percentile distribution of a histogram of µs as `(nines, ms)` points: x = −log10(1 − q),
/// so 1 is p90, 2 is p99, 3 is p99.9 (the usual HDR latency plot).
pub fn percentile_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut pts = Vec::new();
    let mut x = 0.0;
    while x <= 4.0 {
        let q = 1.0 - 10f64.powf(-x);
        pts.push((x, h.value_at_quantile(q) as f64 / 1000.0));
        x += 0.05;
    }
    pts.push((4.2, h.max() as f64 / 1000.0));
    pts
}

/// Labels only at whole x values (plotters puts ticks at fractions too).
fn whole(x: &f64, label: impl Fn(i64) -> String) -> String {
    if (x - x.round()).abs() < 1e-6 { label(x.round() as i64) } else { String::new() }
}

fn nines_label(x: &f64) -> String {
    whole(x, |n| match n {
        0 => "p0".into(),
        1 => "p90".into(),
        2 => "p99".into(),
        3 => "p99.9".into(),
        4 => "p99.99".into(),
        _ => String::new(),
    })
}

/// Latency percentile plot: one line per series, x in nines (p0, p90, p99, p99.9,
/// p99.99, and the max at the right end), y in ms on a log scale.
pub fn percentiles(path: &Path, title: &str, series: &[Series]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    }
    let ys = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|y| *y > 0.0);
    let ymax = ys().fold(0.0f64, f64::max).max(0.01) * 1.5;
    let ymin = ys().fold(f64::INFINITY, f64::min).min(ymax / 10.0).max(0.001) / 1.5;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(e("background"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..4.2, (ymin..ymax).log_scale())
        .map_err(e("axes"))?;
    chart
        .configure_mesh()
        .x_desc("percentile (the last point is the maximum)")
        .y_desc("latency (ms, log scale)")
        .x_labels(5)
        .x_label_formatter(&nines_label)
        .y_label_formatter(&|y| if *y >= 1.0 { format!("{y:.0}") } else { format!("{y:.2}") })
        .draw()
        .map_err(e("mesh"))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).mix(0.9);
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x, y.max(ymin))).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(e("series"))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e("legend"))?;
    root.present().map_err(e("write"))?;
    Ok(())
}

/// Whole numbers only on the x axis (shard counts, seconds).
pub fn whole_x(x: &f64) -> String {
    whole(x, |n| n.to_string())
}

/// The x axis of [`lines`]: description, label format, range, and about how many ticks.
pub struct XAxis<'a> {
    pub desc: &'a str,
    pub fmt: &'a dyn Fn(&f64) -> String,
    pub range: (f64, f64),
    pub ticks: usize,
}

/// A line chart of `series` on linear axes; `x_range` fixes the x axis.
pub fn lines(path: &Path, title: &str, x: XAxis, y_desc: &str, series: &[Series]) -> Result<(), String> {
    let XAxis { desc: x_desc, fmt: x_fmt, range: x_range, ticks: x_ticks } = x;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    }
    let ymax = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(e("background"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range.0..x_range.1, 0.0..ymax)
        .map_err(e("axes"))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(x_ticks)
        .x_label_formatter(x_fmt)
        .y_label_formatter(&|y| {
            if ymax >= 10_000.0 {
                format!("{:.0}k", y / 1000.0)
            } else if ymax >= 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .draw()
        .map_err(e("mesh"))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).mix(0.9);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
            .map_err(e("series"))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 2, color.filled()))).map_err(e("points"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e("legend"))?;
    root.present().map_err(e("write"))?;
    Ok(())
}
