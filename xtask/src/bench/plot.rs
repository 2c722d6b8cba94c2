//! `latency.png`: the latency distribution of the anchor workload (1,000 rps, 1 KB)
//! per setup, percentiles on a log axis as HdrHistogram plots do. Text is drawn with
//! the DejaVu font from Debian's fonts-dejavu-core (no system font stack needed).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::{Results, rig::Setup};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws the percentile curves into `path`.
pub fn latency(path: &Path, results: &Results) -> Result<()> {
    let bytes = std::fs::read(FONT)
        .with_context(|| format!("{FONT} (Debian package fonts-dejavu-core)"))?;
    // plotters keeps registered fonts for the process's lifetime.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;
    // x: "nines" = log10(1 / (1 - q)), so 90% → 1, 99% → 2, 99.9% → 3.
    let nines = |q: f64| -(1.0 - q.min(0.9999)).log10();
    let max_us = results
        .quantiles
        .values()
        .flatten()
        .map(|&(_, us)| us)
        .fold(1.0, f64::max);
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency at 1,000 rps, 1 KB, 4 persistent connections",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..4.0, (10.0..max_us * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_labels(5)
        .x_label_formatter(&|x| match *x as i32 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            _ => "99.99%".into(),
        })
        .draw()?;
    let colors = [BLACK, BLUE, RED, GREEN, MAGENTA];
    for (i, setup) in Setup::ALL.iter().enumerate() {
        let Some(points) = results.quantiles.get(setup) else {
            continue;
        };
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(q, us)| (nines(q), us.max(10.0))),
                color.stroke_width(2),
            ))?
            .label(setup.title())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
