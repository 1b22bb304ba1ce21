//! The PNG chart of `moellava compare`: accuracy and F1 per POPE category, one bar per run.
//! Text is drawn with an embedded DejaVu Sans (no system fonts needed).

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::compare::Run;

static FONT: Once = Once::new();

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

pub fn render(path: &Path, runs: &[Run]) -> Result<()> {
    FONT.call_once(|| {
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
        let _ = register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
    let cats: Vec<String> = runs[0].score.categories.keys().cloned().collect();
    let root = BitMapBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    // A shared legend strip on top, so that no bar is ever hidden behind it.
    let (legend, charts) = root.split_vertically(44);
    let mut x = 60;
    for (ri, r) in runs.iter().enumerate() {
        let colour = PALETTE[ri % PALETTE.len()];
        legend.draw(&Rectangle::new([(x, 16), (x + 16, 32)], colour.filled())).map_err(|e| anyhow!("{e}"))?;
        legend.draw(&Text::new(r.name.clone(), (x + 22, 15), ("sans-serif", 16))).map_err(|e| anyhow!("{e}"))?;
        x += 40 + 9 * r.name.chars().count() as i32;
    }
    let (left, right) = charts.split_horizontally(600);
    for (area, metric, title) in [(left, "accuracy", "Accuracy (%)"), (right, "f1", "F1 (%)")] {
        let values: Vec<Vec<f64>> = runs
            .iter()
            .map(|r| {
                cats.iter()
                    .map(|c| {
                        let s = &r.score.categories[c];
                        100.0 * if metric == "f1" { s.f1 } else { s.accuracy }.unwrap_or(0.0)
                    })
                    .collect()
            })
            .collect();
        let lo = values.iter().flatten().cloned().fold(100.0, f64::min);
        let y0 = ((lo - 5.0) / 5.0).floor().clamp(0.0, 19.0) * 5.0;
        let n = runs.len() as f64;
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("POPE {title}"), ("sans-serif", 24).into_font().style(FontStyle::Bold))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..cats.len() as f64, y0..100.0)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            // Ticks every half unit; the names sit on the half-way ticks, under their group of bars.
            .x_labels(2 * cats.len() + 1)
            .x_label_formatter(&|x| {
                let half = (*x * 2.0).round() as i64;
                if half % 2 == 1 {
                    cats.get((half / 2) as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(title)
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (ri, vals) in values.iter().enumerate() {
            let colour = PALETTE[ri % PALETTE.len()];
            let w = 0.8 / n;
            chart
                .draw_series(vals.iter().enumerate().map(|(ci, v)| {
                    let x0 = ci as f64 + 0.1 + ri as f64 * w;
                    Rectangle::new([(x0, y0), (x0 + w * 0.92, *v)], colour.filled())
                }))
                .map_err(|e| anyhow!("{e}"))?;
            chart
                .draw_series(vals.iter().enumerate().map(|(ci, v)| {
                    let x = ci as f64 + 0.1 + ri as f64 * w + w * 0.46;
                    Text::new(format!("{v:.1}"), (x - 0.06, v + 0.6), ("sans-serif", 12))
                }))
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
