//! PNG charts of a run: latency percentiles over time and throughput, drawn with an
//! embedded font so no system font is needed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::BenchError;
use crate::report::Report;

const W: u32 = 1200;
const H: u32 = 800;
const FONT: &str = "sans-serif";

/// Picks one latency figure out of a series point.
type Metric = fn(&crate::report::SeriesPoint) -> f64;

fn register_font() -> Result<(), BenchError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(BenchError::Plot("embedded font rejected".into()))
    }
}

/// Axis labels without spurious decimals: 0.25, 2.5, 25, 2500.
fn label(v: &f64) -> String {
    let a = v.abs();
    if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn perr<E: std::fmt::Debug>(e: E) -> BenchError {
    BenchError::Plot(format!("{e:?}"))
}

/// Draws the report's per-second series to `path`.
pub fn plot(report: &Report, path: &Path) -> Result<(), BenchError> {
    register_font()?;
    let mut pixels = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        let (top, bottom) = root.split_vertically(H / 2);
        let pts = &report.series;
        let what = if report.scenario == "fanout" {
            "deliveries/s"
        } else {
            "connections/s"
        };
        let latency_title = if report.scenario == "fanout" {
            "end-to-end latency (ms, log scale)"
        } else {
            "connect latency (ms, log scale)"
        };
        let t_max = pts.last().map_or(1, |p| p.t_s + 1).max(1);

        let lat_max = pts.iter().map(|p| p.max_ms).fold(1.0f64, f64::max) * 1.5;
        let lat_min = pts
            .iter()
            .map(|p| p.p50_ms)
            .filter(|v| *v > 0.0)
            .fold(f64::INFINITY, f64::min)
            .min(lat_max / 10.0)
            .max(0.001)
            * 0.5;
        let mut chart = ChartBuilder::on(&top)
            .caption(
                format!(
                    "herald-bench {} — {}: {latency_title}",
                    report.scenario,
                    report.target_label()
                ),
                (FONT, 20),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0u32..t_max, (lat_min..lat_max).log_scale())
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("ms")
            .y_label_formatter(&label)
            .label_style((FONT, 13))
            .draw()
            .map_err(perr)?;
        let lines: [(&str, RGBColor, Metric); 4] = [
            ("p50", BLUE, |p| p.p50_ms),
            ("p90", GREEN, |p| p.p90_ms),
            ("p99", RGBColor(230, 120, 0), |p| p.p99_ms),
            ("max", RED, |p| p.max_ms),
        ];
        for (name, color, f) in lines {
            chart
                .draw_series(LineSeries::new(
                    pts.iter()
                        .filter(|p| p.count > 0)
                        .map(|p| (p.t_s, f(p).max(lat_min))),
                    color.stroke_width(2),
                ))
                .map_err(perr)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(perr)?;

        let y_max = pts.iter().map(|p| p.count).max().unwrap_or(1).max(1) as f64 * 1.1;
        let mut chart = ChartBuilder::on(&bottom)
            .caption(format!("throughput ({what})"), (FONT, 20))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0u32..t_max, 0f64..y_max)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(what)
            .y_label_formatter(&label)
            .label_style((FONT, 13))
            .draw()
            .map_err(perr)?;
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.t_s, p.count as f64)),
                BLUE.stroke_width(2),
            ))
            .map_err(perr)?;
        root.present().map_err(perr)?;
    }
    write_png(path, &pixels)
}

fn write_png(path: &Path, rgb: &[u8]) -> Result<(), BenchError> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, W, H);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(perr)?;
    w.write_image_data(rgb).map_err(perr)?;
    w.finish().map_err(perr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::SeriesPoint;

    #[test]
    fn draws_a_png_without_system_fonts() {
        let mut r = Report {
            scenario: "fanout".into(),
            target: "nats".into(),
            ..Default::default()
        };
        for t in 0..20 {
            r.series.push(SeriesPoint {
                t_s: t,
                count: 1000 + u64::from(t) * 10,
                p50_ms: 0.4,
                p90_ms: 0.9,
                p99_ms: 2.0,
                max_ms: 5.0 + f64::from(t),
            });
        }
        let path =
            std::env::temp_dir().join(format!("herald-bench-plot-{}.png", std::process::id()));
        plot(&r, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let _ = std::fs::remove_file(&path);
        // An empty series still produces a picture.
        r.series.clear();
        plot(&r, &path).unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
