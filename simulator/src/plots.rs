//! SVG plots, written by hand (no plotting dependency): stripes by health and the repair
//! queue over virtual time for one run, durability (nines) against repair bandwidth.

use std::fmt::Write as _;

use bdr_protocol::wire::StripeHealth;
use serde::Serialize;

/// One sample of the cluster's maintenance state, summed over the nodes that are up: the
/// health of the stripes each maintains (from its last survey) and its repair queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RedundancySample {
    /// Virtual milliseconds since the run started.
    pub at_ms: u64,
    pub stripes: StripeHealth,
    pub repair_queued_stripes: u64,
    pub nodes_up: u64,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 400.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 150.0;
const MARGIN_TOP: f64 = 40.0;
const MARGIN_BOTTOM: f64 = 50.0;
const TICKS: u32 = 5;

/// One named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// How the chart draws its series.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Each series a line.
    Lines,
    /// Series stacked on each other as filled areas (counts that add up to a total).
    StackedAreas,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// The x axis is log2 (values doubling per step), with these tick labels at the points.
    pub x_log2_labels: Option<Vec<(f64, String)>>,
    pub style: Style,
    pub series: Vec<Series>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A round step near `range / TICKS` (1, 2 or 5 times a power of ten).
fn tick_step(range: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let rough = range / f64::from(TICKS);
    let power = 10f64.powf(rough.log10().floor());
    let scaled = rough / power;
    let nice = if scaled <= 1.0 {
        1.0
    } else if scaled <= 2.0 {
        2.0
    } else if scaled <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

impl Chart<'_> {
    pub fn render(&self) -> String {
        let transform_x = |x: f64| if self.x_log2_labels.is_some() { x.log2() } else { x };
        // The stacked totals bound the y axis for stacked areas.
        let stacked: Vec<Vec<(f64, f64)>> = match self.style {
            Style::Lines => self.series.iter().map(|series| series.points.clone()).collect(),
            Style::StackedAreas => {
                let mut running: Vec<f64> = vec![0.0; self.series.first().map_or(0, |series| series.points.len())];
                self.series
                    .iter()
                    .map(|series| {
                        series
                            .points
                            .iter()
                            .enumerate()
                            .map(|(index, (x, y))| {
                                running[index] += y;
                                (*x, running[index])
                            })
                            .collect()
                    })
                    .collect()
            }
        };
        let all: Vec<(f64, f64)> = stacked.iter().flatten().copied().collect();
        let x_min = all.iter().map(|(x, _)| transform_x(*x)).fold(f64::INFINITY, f64::min);
        let x_max = all
            .iter()
            .map(|(x, _)| transform_x(*x))
            .fold(f64::NEG_INFINITY, f64::max);
        let (x_min, x_max) = if x_min.is_finite() && x_max > x_min {
            (x_min, x_max)
        } else {
            (0.0, 1.0)
        };
        let y_top = all.iter().map(|(_, y)| *y).fold(0.0, f64::max);
        let y_step = tick_step(y_top);
        let y_max = ((y_top / y_step).ceil() * y_step).max(y_step);
        let plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
        let plot_height = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
        let to_x = |x: f64| MARGIN_LEFT + (transform_x(x) - x_min) / (x_max - x_min) * plot_width;
        let to_y = |y: f64| MARGIN_TOP + plot_height - y / y_max * plot_height;

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            MARGIN_LEFT + plot_width / 2.0,
            escape(self.title)
        );
        // Axes, grid and ticks.
        let mut tick = 0.0;
        while tick <= y_max + y_step / 2.0 {
            let y = to_y(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{MARGIN_LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                MARGIN_LEFT + plot_width,
                MARGIN_LEFT - 6.0,
                y + 4.0,
                format_number(tick)
            );
            tick += y_step;
        }
        let x_ticks: Vec<(f64, String)> = match &self.x_log2_labels {
            Some(labels) => labels.clone(),
            None => {
                let step = tick_step(x_max - x_min);
                let mut ticks = Vec::new();
                let mut value = (x_min / step).ceil() * step;
                while value <= x_max + step / 1000.0 {
                    ticks.push((value, format_number(value)));
                    value += step;
                }
                ticks
            }
        };
        for (value, label) in &x_ticks {
            let x = to_x(*value);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#999"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                MARGIN_TOP + plot_height,
                MARGIN_TOP + plot_height + 5.0,
                MARGIN_TOP + plot_height + 18.0,
                escape(label)
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_width}" height="{plot_height}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            MARGIN_LEFT + plot_width / 2.0,
            HEIGHT - 12.0,
            escape(self.x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            MARGIN_TOP + plot_height / 2.0,
            MARGIN_TOP + plot_height / 2.0,
            escape(self.y_label)
        );
        // The series, then the legend.
        for (position, (series, points)) in self.series.iter().zip(&stacked).enumerate() {
            if points.is_empty() {
                continue;
            }
            let line: Vec<String> = points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", to_x(*x), to_y(*y)))
                .collect();
            match self.style {
                Style::Lines => {
                    let _ = writeln!(
                        svg,
                        r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                        line.join(" "),
                        series.color
                    );
                    for point in &line {
                        let (x, y) = point.split_once(',').expect("x,y");
                        let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="3" fill="{}"/>"#, series.color);
                    }
                }
                Style::StackedAreas => {
                    // Down along this series' top, back along the one below.
                    let below: Vec<String> = match position {
                        0 => points
                            .iter()
                            .rev()
                            .map(|(x, _)| format!("{:.1},{:.1}", to_x(*x), to_y(0.0)))
                            .collect(),
                        _ => stacked[position - 1]
                            .iter()
                            .rev()
                            .map(|(x, y)| format!("{:.1},{:.1}", to_x(*x), to_y(*y)))
                            .collect(),
                    };
                    let _ = writeln!(
                        svg,
                        r#"<polygon points="{} {}" fill="{}" fill-opacity="0.85" stroke="none"/>"#,
                        line.join(" "),
                        below.join(" "),
                        series.color
                    );
                }
            }
            let legend_y = MARGIN_TOP + 10.0 + position as f64 * 18.0;
            let legend_x = MARGIN_LEFT + plot_width + 12.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{legend_x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                legend_y - 10.0,
                series.color,
                legend_x + 18.0,
                legend_y,
                escape(&series.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn format_number(value: f64) -> String {
    if value.fract().abs() < 1e-9 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// Stripes by health over virtual time, stacked (they add up to the stripes surveyed).
pub fn redundancy_chart(samples: &[RedundancySample]) -> String {
    let seconds = |sample: &RedundancySample| sample.at_ms as f64 / 1000.0;
    let series = |name: &str, color: &'static str, value: fn(&RedundancySample) -> u64| Series {
        name: name.into(),
        color,
        points: samples
            .iter()
            .map(|sample| (seconds(sample), value(sample) as f64))
            .collect(),
    };
    Chart {
        title: "Stripes by health (sum of the maintainers' last surveys)",
        x_label: "virtual time (s)",
        y_label: "stripes",
        x_log2_labels: None,
        style: Style::StackedAreas,
        series: vec![
            series("healthy", "#2e9e44", |sample| sample.stripes.healthy),
            series("misplaced", "#3b7dd8", |sample| sample.stripes.misplaced),
            series("degraded", "#e0c020", |sample| sample.stripes.degraded),
            series("at risk", "#f08020", |sample| sample.stripes.at_risk),
            series("lost", "#d02020", |sample| sample.stripes.lost),
            series("unknown", "#999999", |sample| sample.stripes.unknown),
        ],
    }
    .render()
}

/// Stripes queued for repair over virtual time, and the nodes up.
pub fn repair_queue_chart(samples: &[RedundancySample]) -> String {
    let seconds = |sample: &RedundancySample| sample.at_ms as f64 / 1000.0;
    Chart {
        title: "Repair queue (stripes queued, summed over the nodes up)",
        x_label: "virtual time (s)",
        y_label: "stripes / nodes",
        x_log2_labels: None,
        style: Style::Lines,
        series: vec![
            Series {
                name: "queued stripes".into(),
                color: "#d05020",
                points: samples
                    .iter()
                    .map(|sample| (seconds(sample), sample.repair_queued_stripes as f64))
                    .collect(),
            },
            Series {
                name: "nodes up".into(),
                color: "#3b7dd8",
                points: samples
                    .iter()
                    .map(|sample| (seconds(sample), sample.nodes_up as f64))
                    .collect(),
            },
        ],
    }
    .render()
}

/// One point of the durability plot: (repair bandwidth in bytes/s, Monte Carlo nines,
/// analytic nines); nines are None where no loss was seen.
pub type DurabilityPoint = (f64, Option<f64>, Option<f64>);

/// Nines of annual durability (Monte Carlo and analytic) against repair bandwidth.
/// Points without a loss seen have no nines and are left out.
pub fn durability_chart(points: &[DurabilityPoint]) -> String {
    let labels = points
        .iter()
        .map(|(bandwidth, _, _)| (*bandwidth, format!("{:.0}", bandwidth / (1024.0 * 1024.0))))
        .collect();
    let pick = |value: fn(&DurabilityPoint) -> Option<f64>| {
        points
            .iter()
            .filter_map(|point| value(point).map(|nines| (point.0, nines)))
            .collect()
    };
    Chart {
        title: "Annual durability against repair bandwidth",
        x_label: "repair bandwidth per failed node (MiB/s, log scale)",
        y_label: "nines (-log10 annual loss probability)",
        x_log2_labels: Some(labels),
        style: Style::Lines,
        series: vec![
            Series {
                name: "Monte Carlo".into(),
                color: "#d05020",
                points: pick(|point| point.1),
            },
            Series {
                name: "analytic MTTDL".into(),
                color: "#3b7dd8",
                points: pick(|point| point.2),
            },
        ],
    }
    .render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg_with_every_series() {
        let samples: Vec<RedundancySample> = (0..10)
            .map(|second| RedundancySample {
                at_ms: second * 1000,
                stripes: StripeHealth {
                    healthy: 10 + second,
                    degraded: 10 - second,
                    ..StripeHealth::default()
                },
                repair_queued_stripes: 10 - second,
                nodes_up: 6,
            })
            .collect();
        for svg in [redundancy_chart(&samples), repair_queue_chart(&samples)] {
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            assert_eq!(svg.matches("<svg").count(), 1);
        }
        assert!(redundancy_chart(&samples).contains("degraded"));
        assert_eq!(redundancy_chart(&samples).matches("<polygon").count(), 6);
        let durability = durability_chart(&[(1e6, Some(5.0), Some(6.0)), (2e6, Some(7.0), None)]);
        assert_eq!(durability.matches("<polyline").count(), 2);
        assert!(durability.contains("analytic"));
    }
}
