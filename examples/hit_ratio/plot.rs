//! The SVG of a run: one panel per question, the strategies in one legend
//! on top (so no panel needs labels under its bars), every value written
//! above its bar.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::Report;

const PANEL: (u32, u32) = (440, 340);
const LEGEND: u32 = 44;
const COLUMNS: usize = 3;

fn color(name: &str) -> RGBColor {
    match name {
        "per-key" => RGBColor(0x99, 0x99, 0x99),
        "dataloader" => RGBColor(0xe6, 0x9f, 0x00),
        "cache-aside" => RGBColor(0xd5, 0x5e, 0x00),
        "loadlock-held" => RGBColor(0x56, 0xb4, 0xe9),
        _ => RGBColor(0x00, 0x72, 0xb2),
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Drawn = Result<(), Box<dyn std::error::Error>>;
type Panel<'r> = Box<dyn Fn(&Area) -> Drawn + 'r>;

/// A value written centred above the point it labels.
fn above(text: String, at: (f64, f64), size: u32) -> Text<'static, (f64, f64), String> {
    let style = ("sans-serif", size)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    Text::new(text, at, style)
}

/// Milliseconds as a short label: "48", "1.2 s".
fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1} s", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

pub(super) fn draw(
    path: &std::path::Path,
    reports: &[Report],
    sweep: &[Report],
    ttl_sweep: &[Report],
    limit: f64,
) -> Drawn {
    let mut panels: Vec<Panel> = vec![
        Box::new(|a| hit_ratio(a, reports)),
        Box::new(|a| {
            counts(a, reports, "provider calls (log scale)", |r| {
                r.provider_calls
            })
        }),
        Box::new(|a| counts(a, reports, "calls refused: 429s (log scale)", |r| r.refused)),
        Box::new(|a| latency(a, reports)),
        Box::new(|a| calls_over_time(a, reports, limit)),
    ];
    if !sweep.is_empty() {
        panels.push(Box::new(|a| by_instances(a, sweep)));
    }
    if !ttl_sweep.is_empty() {
        panels.push(Box::new(|a| by_ttl(a, ttl_sweep)));
    }
    let rows = panels.len().div_ceil(COLUMNS);
    let size = (PANEL.0 * COLUMNS as u32, LEGEND + PANEL.1 * rows as u32);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(LEGEND);
    legend(&top, reports)?;
    let cells = body.split_evenly((rows, COLUMNS));
    for (panel, cell) in panels.iter().zip(&cells) {
        panel(cell)?;
    }
    root.present()?;
    Ok(())
}

/// The strategies' colours, in a row.
fn legend(area: &Area, reports: &[Report]) -> Drawn {
    let mut x = 16;
    for r in reports {
        area.draw(&Rectangle::new(
            [(x, 14), (x + 16, 30)],
            color(r.name).filled(),
        ))?;
        area.draw(&Text::new(r.name, (x + 22, 15), ("sans-serif", 16)))?;
        x += 40 + 9 * r.name.len() as i32;
    }
    Ok(())
}

fn hit_ratio(area: &Area, reports: &[Report]) -> Drawn {
    let n = reports.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption("hit ratio (black line: ideal)", ("sans-serif", 17))
        .margin(14)
        .x_label_area_size(8)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..n, 0f64..1.12f64)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()?;
    for (i, r) in reports.iter().enumerate() {
        let x = i as f64;
        chart.draw_series([Rectangle::new(
            [(x + 0.15, 0.0), (x + 0.85, r.hit_ratio)],
            color(r.name).filled(),
        )])?;
        chart.draw_series([PathElement::new(
            [(x + 0.1, r.ideal_hit_ratio), (x + 0.9, r.ideal_hit_ratio)],
            BLACK.stroke_width(2),
        )])?;
        let top = r.hit_ratio.max(r.ideal_hit_ratio) + 0.015;
        chart.draw_series([above(format!("{:.3}", r.hit_ratio), (x + 0.5, top), 13)])?;
    }
    Ok(())
}

/// A count per strategy on a log scale (zero drawn as no bar).
fn counts(area: &Area, reports: &[Report], caption: &str, count: impl Fn(&Report) -> u64) -> Drawn {
    let n = reports.len() as f64;
    let max = reports.iter().map(&count).max().unwrap_or(1).max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(14)
        .x_label_area_size(8)
        .y_label_area_size(54)
        .build_cartesian_2d(0f64..n, (0.8f64..max * 4.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, r) in reports.iter().enumerate() {
        let x = i as f64;
        let value = count(r);
        if value > 0 {
            chart.draw_series([Rectangle::new(
                [(x + 0.15, 0.8), (x + 0.85, value as f64)],
                color(r.name).filled(),
            )])?;
        }
        let top = (value as f64).max(0.8) * 1.15;
        chart.draw_series([above(value.to_string(), (x + 0.5, top), 13)])?;
    }
    Ok(())
}

/// p50 (full colour) and p99 (light) per strategy, log scale.
fn latency(area: &Area, reports: &[Report]) -> Drawn {
    let n = reports.len() as f64;
    let max = reports.iter().map(|r| r.p99_ms).fold(1.0, f64::max);
    let min = reports
        .iter()
        .map(|r| r.p50_ms)
        .fold(max, f64::min)
        .max(0.1);
    let mut chart = ChartBuilder::on(area)
        .caption("latency ms: p50 (dark), p99 (light)", ("sans-serif", 17))
        .margin(14)
        .x_label_area_size(8)
        .y_label_area_size(54)
        .build_cartesian_2d(0f64..n, (min / 2.0..max * 4.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_label_formatter(&|v| ms(*v))
        .draw()?;
    let floor = min / 2.0;
    for (i, r) in reports.iter().enumerate() {
        let x = i as f64;
        let c = color(r.name);
        chart.draw_series([
            Rectangle::new([(x + 0.1, floor), (x + 0.48, r.p50_ms)], c.filled()),
            Rectangle::new(
                [(x + 0.52, floor), (x + 0.9, r.p99_ms)],
                c.mix(0.45).filled(),
            ),
        ])?;
        chart.draw_series([
            above(ms(r.p50_ms), (x + 0.29, r.p50_ms * 1.12), 11),
            above(ms(r.p99_ms), (x + 0.71, r.p99_ms * 1.12), 11),
        ])?;
    }
    Ok(())
}

/// Calls the provider answered per second of the run, against its limit.
fn calls_over_time(area: &Area, reports: &[Report], limit: f64) -> Drawn {
    let seconds = reports
        .iter()
        .map(|r| r.calls_per_second.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let peak = reports
        .iter()
        .flat_map(|r| r.calls_per_second.iter().map(|&(made, _)| made))
        .max()
        .unwrap_or(1) as f64;
    // A limit far above every rate would flatten the lines: left out.
    let show_limit = limit <= peak * 3.0;
    let top = if show_limit { peak.max(limit) } else { peak } * 1.25;
    let caption = if show_limit {
        format!("provider calls per second (dashed: limit {limit:.0})")
    } else {
        "provider calls answered per second".to_owned()
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(14)
        .x_label_area_size(34)
        .y_label_area_size(54)
        .build_cartesian_2d(0f64..seconds, 0f64..top.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("seconds into the run")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    if show_limit {
        chart.draw_series(DashedLineSeries::new(
            [(0.0, limit), (seconds, limit)],
            6,
            4,
            BLACK.stroke_width(1),
        ))?;
    }
    for r in reports {
        let points: Vec<(f64, f64)> = r
            .calls_per_second
            .iter()
            .enumerate()
            .flat_map(|(s, &(made, _))| {
                // A step per second.
                [(s as f64, made as f64), (s as f64 + 1.0, made as f64)]
            })
            .collect();
        chart.draw_series(LineSeries::new(points, color(r.name).stroke_width(2)))?;
    }
    Ok(())
}

fn by_instances(area: &Area, sweep: &[Report]) -> Drawn {
    let max_n = sweep.iter().map(|r| r.instances).max().unwrap_or(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption("hit ratio by instances", ("sans-serif", 17))
        .margin(14)
        .x_label_area_size(34)
        .y_label_area_size(44)
        .build_cartesian_2d(0.5f64..max_n + 0.5, 0f64..1.05f64)?;
    chart
        .configure_mesh()
        .x_desc("instances")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()?;
    for name in ["dataloader", "cache-aside", "loadlock"] {
        let points: Vec<(f64, f64)> = sweep
            .iter()
            .filter(|r| r.name == name)
            .map(|r| (r.instances as f64, r.hit_ratio))
            .collect();
        let c = color(name);
        chart.draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    Ok(())
}

/// loadlock's hit ratio per TTL, each point labelled with its calls.
fn by_ttl(area: &Area, sweep: &[Report]) -> Drawn {
    let n = sweep.len();
    let ttls: Vec<f64> = sweep.iter().map(|r| r.ttl_s).collect();
    let mut chart = ChartBuilder::on(area)
        .caption("loadlock by TTL: hit ratio, calls", ("sans-serif", 17))
        .margin(14)
        .x_label_area_size(34)
        .y_label_area_size(44)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..1.12f64)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("TTL, seconds")
        .x_labels(n)
        .x_label_formatter(&|v| {
            let i = v.round();
            match ttls.get(i as usize) {
                Some(ttl) if (v - i).abs() < 0.01 && i >= 0.0 => format!("{ttl}"),
                _ => String::new(),
            }
        })
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()?;
    let c = color("loadlock");
    let points: Vec<(f64, f64)> = sweep
        .iter()
        .enumerate()
        .map(|(i, r)| (i as f64, r.hit_ratio))
        .collect();
    chart.draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    for (r, &(x, y)) in sweep.iter().zip(&points) {
        chart.draw_series([above(
            format!("{} calls", r.provider_calls),
            (x, y + 0.03),
            12,
        )])?;
    }
    Ok(())
}
