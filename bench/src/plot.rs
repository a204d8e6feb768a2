//! SVG plots of a run (plotters' SVG backend: text is left to the viewer's fonts, so no font
//! or system library is needed): per-token latency against concurrency, and throughput.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::run::PathKind;

/// One line: a label, its colour index and its points.
pub struct Line {
    pub label: String,
    pub path: PathKind,
    /// Percentile lines other than p50 are drawn with markers.
    pub marked: bool,
    pub points: Vec<(f64, f64)>,
}

fn colour(path: PathKind) -> RGBColor {
    match path {
        PathKind::Baseline => RGBColor(110, 110, 110),
        PathKind::Bridge => RGBColor(200, 30, 45),
        PathKind::LiteLlm => RGBColor(30, 90, 200),
    }
}

/// A panel of lines over a log-scaled x axis (concurrent streams).
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub lines: Vec<Line>,
    /// Horizontal reference lines (label, y).
    pub references: Vec<(String, f64)>,
    pub log_y: bool,
}

fn bounds(panel: &Panel) -> ((f64, f64), (f64, f64)) {
    let xs = panel
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0));
    let ys = panel
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .chain(panel.references.iter().map(|r| r.1));
    let (x_min, x_max) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (y_min, y_max) = ys
        .filter(|y| y.is_finite() && *y > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if x_min > x_max || y_min > y_max {
        return ((1.0, 10.0), (0.1, 1.0));
    }
    let y_range = if panel.log_y {
        (y_min / 2.0, y_max * 2.0)
    } else {
        (0.0, y_max * 1.15)
    };
    ((x_min.max(0.5) / 1.5, x_max * 1.5), y_range)
}

/// Draws `panels` side by side into one SVG file.
pub fn draw(path: &Path, panels: &[Panel]) -> anyhow::Result<()> {
    let width = 640 * u32::try_from(panels.len().max(1)).unwrap_or(1);
    let root = SVGBackend::new(path, (width, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(&areas) {
        draw_panel(panel, area)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn draw_panel(
    panel: &Panel,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> anyhow::Result<()> {
    let ((x0, x1), (y0, y1)) = bounds(panel);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64);
    if panel.log_y {
        let mut chart = builder
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("concurrent streams")
            .y_desc(panel.y_label.as_str())
            .x_label_formatter(&|x| format!("{x}"))
            .y_label_formatter(&|y| format!("{y}"))
            .draw()
            .map_err(plot_error)?;
        series(&mut chart, panel, x0, x1)?;
    } else {
        let mut chart = builder
            .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("concurrent streams")
            .y_desc(panel.y_label.as_str())
            .x_label_formatter(&|x| format!("{x}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(plot_error)?;
        series(&mut chart, panel, x0, x1)?;
    }
    Ok(())
}

fn series<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    panel: &Panel,
    x0: f64,
    x1: f64,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for line in &panel.lines {
        let style = colour(line.path);
        let stroke = if line.marked {
            style.stroke_width(1)
        } else {
            style.stroke_width(2)
        };
        let drawn = chart
            .draw_series(LineSeries::new(line.points.iter().copied(), stroke))
            .map_err(plot_error)?;
        drawn
            .label(line.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], stroke));
        if line.marked {
            chart
                .draw_series(
                    line.points
                        .iter()
                        .map(|&p| Circle::new(p, 3, style.filled())),
                )
                .map_err(plot_error)?;
        }
    }
    for (label, y) in &panel.references {
        let style = BLACK.mix(0.5).stroke_width(1);
        chart
            .draw_series(LineSeries::new(vec![(x0, *y), (x1, *y)], style))
            .map_err(plot_error)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// One curve of a time series: a label and (minutes, value) points.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A panel of curves over linear time (minutes since the start), with a shaded warm-up.
pub struct TimePanel {
    pub title: String,
    pub y_label: String,
    pub curves: Vec<Curve>,
    /// Minutes of warm-up, drawn as a vertical line.
    pub warmup_min: f64,
}

const CURVE_COLOURS: [RGBColor; 5] = [
    RGBColor(200, 30, 45),
    RGBColor(30, 90, 200),
    RGBColor(40, 150, 60),
    RGBColor(150, 80, 180),
    RGBColor(110, 110, 110),
];

/// Draws time-series `panels` side by side into one SVG file.
pub fn draw_time_series(path: &Path, panels: &[TimePanel]) -> anyhow::Result<()> {
    let width = 640 * u32::try_from(panels.len().max(1)).unwrap_or(1);
    let root = SVGBackend::new(path, (width, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(&areas) {
        let points = || panel.curves.iter().flat_map(|c| c.points.iter());
        let x1 = points().map(|p| p.0).fold(1.0_f64, f64::max);
        let y1 = points()
            .map(|p| p.1)
            .filter(|y| y.is_finite())
            .fold(1.0_f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x1, 0.0..y1)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(panel.y_label.as_str())
            .y_label_formatter(&|y| format!("{y:.1}"))
            .draw()
            .map_err(plot_error)?;
        for (i, curve) in panel.curves.iter().enumerate() {
            let stroke = CURVE_COLOURS[i % CURVE_COLOURS.len()].stroke_width(2);
            chart
                .draw_series(LineSeries::new(curve.points.iter().copied(), stroke))
                .map_err(plot_error)?
                .label(curve.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], stroke));
        }
        let style = BLACK.mix(0.4).stroke_width(1);
        chart
            .draw_series(LineSeries::new(
                vec![(panel.warmup_min, 0.0), (panel.warmup_min, y1)],
                style,
            ))
            .map_err(plot_error)?
            .label("end of warm-up")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error(error: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("plotting failed: {error:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_with_text() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("p.svg");
        let panel = Panel {
            title: "latency".to_owned(),
            y_label: "ms".to_owned(),
            lines: vec![Line {
                label: "bridge p99".to_owned(),
                path: PathKind::Bridge,
                marked: true,
                points: vec![(1.0, 0.5), (100.0, 1.5), (1000.0, 4.0)],
            }],
            references: vec![("target".to_owned(), 3.0)],
            log_y: true,
        };
        draw(&path, &[panel])?;
        let svg = std::fs::read_to_string(&path)?;
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("bridge p99"));
        Ok(())
    }
}
