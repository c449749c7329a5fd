//! The SVG chart of a report: one panel per figure group, a horizontal bar per variant at its
//! median, with a whisker from min to max.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{
    coord::ranged1d::{IntoSegmentedCoord, SegmentValue},
    prelude::*,
};

use crate::report::{Report, num};

const PANEL_W: u32 = 620;
const PANEL_H: u32 = 300;
const COLUMNS: usize = 2;

pub fn draw(report: &Report, path: &Path) -> Result<()> {
    let mut groups: Vec<&str> = Vec::new();
    for f in &report.figures {
        if !groups.contains(&f.group.as_str()) {
            groups.push(&f.group);
        }
    }
    let columns = groups.len().clamp(1, COLUMNS);
    let rows = groups.len().div_ceil(columns).max(1);
    let size = (PANEL_W * columns as u32, PANEL_H * rows as u32 + 40);
    let root = SVGBackend::new(path, size).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "nsfail bench {}: {} (median, whiskers min..max)",
        report.name, report.title
    );
    let root = root
        .titled(&title, ("sans-serif", 18))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((rows, columns));
    for (group, area) in groups.iter().zip(panels.iter()) {
        let figures: Vec<_> = report
            .figures
            .iter()
            .filter(|f| f.group == *group)
            .collect();
        let unit = figures.first().map(|f| f.unit.clone()).unwrap_or_default();
        let stats: Vec<_> = figures.iter().map(|f| f.summary()).collect();
        let top = stats
            .iter()
            .map(|s| s.max)
            .filter(|x| x.is_finite())
            .fold(0.0, f64::max)
            .max(1e-9)
            * 1.35;
        let n = figures.len() as i32;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{group} ({unit})"), ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(170)
            // Segments 0..=last: one per variant, the first variant at the top.
            .build_cartesian_2d(0.0..top, (0..(n - 1).max(1)).into_segmented())
            .map_err(|e| err(&e))?;
        let names: Vec<String> = figures.iter().rev().map(|f| f.variant.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(WHITE)
            .y_labels(figures.len())
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .x_label_formatter(&|x| num(*x))
            .draw()
            .map_err(|e| err(&e))?;
        let bar = RGBColor(70, 110, 170);
        let highlight = RGBColor(200, 90, 40);
        for (i, (f, s)) in figures.iter().zip(&stats).enumerate() {
            if !s.median.is_finite() {
                continue;
            }
            let i = n - 1 - i as i32;
            let color = if f.variant.starts_with("nsfail") {
                highlight
            } else {
                bar
            };
            let mut rect = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (s.median, SegmentValue::Exact(i + 1)),
                ],
                color.mix(0.8).filled(),
            );
            rect.set_margin(6, 6, 0, 0);
            let whisker = PathElement::new(
                vec![
                    (s.min, SegmentValue::CenterOf(i)),
                    (s.max, SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            );
            let label = Text::new(
                format!("{} [{}, {}]", num(s.median), num(s.min), num(s.max)),
                (s.max.max(s.median), SegmentValue::CenterOf(i)),
                ("sans-serif", 12),
            );
            chart.draw_series([rect]).map_err(|e| err(&e))?;
            chart.draw_series([whisker]).map_err(|e| err(&e))?;
            chart.draw_series([label]).map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
