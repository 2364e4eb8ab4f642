//! SVG plots of a run, drawn with plotters' SVG backend (text is left to
//! the SVG viewer, so no font is needed at build time).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

const SIZE: (u32, u32) = (900, 560);

/// One line of a plot: a scenario's name and its points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

fn color(index: usize) -> RGBColor {
    // Distinguishable, also in grey scale print.
    const COLORS: [RGBColor; 8] = [
        RGBColor(0, 0, 0),
        RGBColor(230, 97, 1),
        RGBColor(30, 120, 200),
        RGBColor(0, 150, 80),
        RGBColor(170, 40, 160),
        RGBColor(200, 30, 30),
        RGBColor(120, 120, 120),
        RGBColor(150, 120, 0),
    ];
    COLORS[index % COLORS.len()]
}

/// Latency against percentile, the percentile axis in "nines" (1 = p90,
/// 2 = p99, 3 = p99.9), latency on a log scale.
pub fn latency_percentiles(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    let all = series.iter().flat_map(|s| s.points.iter());
    let max_x = all.clone().map(|p| p.0).fold(1.0f64, f64::max);
    let min_y = all.clone().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let max_y = all.map(|p| p.1).fold(0.0f64, f64::max);
    if !min_y.is_finite() || max_y <= 0.0 {
        return Err(anyhow!("no latency data to plot"));
    }
    let (low, high) = ((min_y * 0.8).max(0.1), max_y * 1.25);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_x.ceil(), (low..high).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs), corrected for coordinated omission")
        .x_labels(max_x.ceil() as usize + 1)
        .x_label_formatter(&|nines| nines_label(*nines))
        .y_label_formatter(&|us| format!("{us}"))
        .draw()
        .map_err(plot_error)?;
    draw_series(&mut chart, series)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// `y` against `x` on linear axes starting at 0.
pub fn lines(path: &Path, title: &str, desc: (&str, &str), series: &[Series]) -> Result<()> {
    let all = series.iter().flat_map(|s| s.points.iter());
    let max_x = all.clone().map(|p| p.0).fold(1.0f64, f64::max);
    let max_y = all.map(|p| p.1).fold(1.0f64, f64::max);
    let axes = (0.0..max_x * 1.02, 0.0..max_y * 1.1);
    labelled_lines(path, title, desc, axes, series, false)
}

/// `y` against `x` with `x` on a log scale (sizes spanning decades: 1, 100,
/// 1,000) and `y` linear from 0, each point marked.
pub fn lines_log_x(path: &Path, title: &str, desc: (&str, &str), series: &[Series]) -> Result<()> {
    let all = series.iter().flat_map(|s| s.points.iter());
    let min_x = all.clone().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let max_x = all.clone().map(|p| p.0).fold(0.0f64, f64::max);
    let max_y = all.map(|p| p.1).fold(1.0f64, f64::max);
    if !min_x.is_finite() || min_x <= 0.0 {
        return Err(anyhow!("no positive x values to plot on a log scale"));
    }
    let axes = ((min_x * 0.7..max_x * 1.4).log_scale(), 0.0..max_y * 1.15);
    labelled_lines(path, title, desc, axes, series, true)
}

/// The chart behind [`lines`] and [`lines_log_x`]: whole-number labels on
/// both axes, a line per series, and a dot on each point when `marks`.
fn labelled_lines<X, Y>(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    (x, y): (X, Y),
    series: &[Series],
    marks: bool,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(plot_error)?;
    draw_series(&mut chart, series)?;
    for (index, s) in series.iter().enumerate().filter(|_| marks) {
        let style = ShapeStyle::from(&color(index)).filled();
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 5, style)))
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn draw_series<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    series: &[Series],
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (index, s) in series.iter().enumerate() {
        // Earlier lines wider, so lines that coincide (several modes at zero
        // conntrack entries) still all show.
        let width = 2 + 2 * (series.len() - 1 - index) as u32;
        let style = ShapeStyle::from(&color(index)).stroke_width(width);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))
            .map_err(plot_error)?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

fn nines_label(nines: f64) -> String {
    let percentile = 100.0 * (1.0 - 10f64.powf(-nines));
    if nines < 0.5 {
        "p0".into()
    } else {
        let digits = (nines.round() as usize).saturating_sub(2);
        format!("p{percentile:.digits$}")
    }
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(nines_label(0.0), "p0");
        assert_eq!(nines_label(1.0), "p90");
        assert_eq!(nines_label(2.0), "p99");
        assert_eq!(nines_label(3.0), "p99.9");
        assert_eq!(nines_label(4.0), "p99.99");
    }

    #[test]
    fn draws_svg() {
        let dir = std::env::temp_dir().join(format!("sl-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Series {
            name: "direct",
            points: vec![(0.0, 20.0), (1.0, 30.0), (3.0, 100.0)],
        };
        let path = dir.join("p.svg");
        latency_percentiles(&path, "t", &[a]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("direct") && svg.contains("p99.9"));
        let b = Series {
            name: "redirect",
            points: vec![(0.0, 0.0), (100.0, 200.0)],
        };
        lines(&dir.join("l.svg"), "t", ("x", "y"), &[b]).unwrap();
        let c = Series {
            name: "tproxy",
            points: vec![(1.0, 9000.0), (100.0, 8000.0), (1000.0, 5000.0)],
        };
        let path = dir.join("x.svg");
        lines_log_x(&path, "t", ("x", "y"), &[c]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("tproxy") && svg.contains("<circle"), "{svg}");
        let none = Series {
            name: "e",
            points: vec![],
        };
        assert!(lines_log_x(&path, "t", ("x", "y"), &[none]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
