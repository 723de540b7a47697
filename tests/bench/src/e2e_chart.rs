//! The end-to-end benchmark's chart, drawn with `plotters` (SVG backend, no system fonts: text
//! is laid out with plotters' own size estimate and rendered by the viewer): a title, one
//! legend for every series, then one block per section (a topology: same node, cross node),
//! each a grid of grouped-bar panels. What is drawn is data ([`Section`], [`Panel`],
//! [`Series`]); a new configuration is one more series, a new topology one more section.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One bar series: a configuration's value in each group (`None`: not measured or invalid).
pub struct Series {
    /// The legend's name of the configuration.
    pub name: String,
    /// One value per group of the panel, in the panel's group order.
    pub values: Vec<Option<f64>>,
}

/// One panel: groups along x (e.g. connection counts), one bar per series in each group.
pub struct Panel {
    /// The panel's title.
    pub title: String,
    /// The group labels, left to right.
    pub groups: Vec<String>,
    /// The bars of each group, in legend order.
    pub series: Vec<Series>,
}

/// A block of panels under a heading (one topology).
pub struct Section {
    /// The heading.
    pub title: String,
    /// Its panels, laid out in rows of the chart's column count.
    pub panels: Vec<Panel>,
}

/// Bar colours, by series name in order of first appearance (colour-blind safe, Okabe–Ito).
const COLOURS: [RGBColor; 8] = [
    RGBColor(0x99, 0x99, 0x99),
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0x56, 0xB4, 0xE9),
    RGBColor(0xD5, 0x5E, 0x00),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0xCC, 0x79, 0xA7),
    RGBColor(0xF0, 0xE4, 0x42),
];

const PANEL_W: u32 = 460;
const PANEL_H: u32 = 260;
const HEADER_H: u32 = 76;
const SECTION_H: u32 = 26;

/// A "nice" axis maximum at or above `v` (1, 2 or 5 times a power of ten).
pub fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&m| m >= v)
        .unwrap_or(10.0 * p)
}

fn fmt_tick(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v}")
    }
}

fn fmt_bar(v: f64) -> String {
    if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Every series name, in order of first appearance: the legend, and each name's colour.
fn legend(sections: &[Section]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for series in sections
        .iter()
        .flat_map(|s| &s.panels)
        .flat_map(|p| &p.series)
    {
        if !names.contains(&series.name) {
            names.push(series.name.clone());
        }
    }
    names
}

fn colour(legend: &[String], name: &str) -> RGBColor {
    let i = legend.iter().position(|n| n == name).unwrap_or(0);
    COLOURS[i % COLOURS.len()]
}

type DrawResult<T> = Result<T, String>;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// The SVG: `title` and `subtitle` on top, the legend, then each section's heading and its
/// panels in rows of `columns`.
///
/// # Errors
///
/// A message if plotters cannot draw (it draws into a string, so only on a bug here).
pub fn svg(
    title: &str,
    subtitle: &str,
    sections: &[Section],
    columns: usize,
) -> DrawResult<String> {
    let columns = columns.max(1);
    let rows: Vec<usize> = sections
        .iter()
        .map(|s| s.panels.len().div_ceil(columns))
        .collect();
    let width = PANEL_W * columns as u32 + 20;
    let height = HEADER_H
        + rows
            .iter()
            .map(|r| SECTION_H + PANEL_H * *r as u32)
            .sum::<u32>()
        + 10;
    let names = legend(sections);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (header, mut body) = root.split_vertically(HEADER_H);
        header
            .draw_text(
                title,
                &("sans-serif", 15)
                    .into_font()
                    .style(FontStyle::Bold)
                    .color(&BLACK),
                (10, 8),
            )
            .map_err(err)?;
        header
            .draw_text(
                subtitle,
                &("sans-serif", 11)
                    .into_font()
                    .color(&RGBColor(0x55, 0x55, 0x55)),
                (10, 30),
            )
            .map_err(err)?;
        let mut x = 10;
        for name in &names {
            header
                .draw(&Rectangle::new(
                    [(x, 50), (x + 12, 62)],
                    colour(&names, name).filled(),
                ))
                .map_err(err)?;
            header
                .draw_text(
                    name,
                    &("sans-serif", 11).into_font().color(&BLACK),
                    (x + 16, 50),
                )
                .map_err(err)?;
            x += 28 + 7 * name.chars().count() as i32;
        }
        for (section, rows) in sections.iter().zip(rows) {
            let (block, rest) = body.split_vertically(SECTION_H + PANEL_H * rows as u32);
            body = rest;
            let (heading, grid) = block.split_vertically(SECTION_H);
            heading
                .draw_text(
                    &section.title,
                    &("sans-serif", 13)
                        .into_font()
                        .style(FontStyle::Bold)
                        .color(&BLACK),
                    (10, 6),
                )
                .map_err(err)?;
            let cells = grid.split_evenly((rows.max(1), columns));
            for (area, panel) in cells.iter().zip(&section.panels) {
                draw_panel(area, panel, &names)?;
            }
        }
        root.present().map_err(err)?;
    }
    Ok(out)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    names: &[String],
) -> DrawResult<()> {
    let max = panel
        .series
        .iter()
        .flat_map(|se| se.values.iter().flatten())
        .copied()
        .fold(0.0, f64::max);
    let top = nice_max(max);
    let groups = panel.groups.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(
            &panel.title,
            ("sans-serif", 12).into_font().style(FontStyle::Bold),
        )
        .margin(6)
        .x_label_area_size(20)
        .y_label_area_size(48)
        // Group `g` is centred on x = g, so that the axis' key points (steps of 1) are the
        // group centres.
        .build_cartesian_2d(-0.5f64..groups as f64 - 0.5, 0f64..top)
        .map_err(err)?;
    let labels = panel.groups.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups)
        .y_labels(5)
        .y_label_formatter(&|v| fmt_tick(*v))
        .x_label_formatter(&|x| {
            let g = x.round();
            if (x - g).abs() < 1e-6 && g >= 0.0 {
                labels.get(g as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 10))
        .light_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .draw()
        .map_err(err)?;
    let n = panel.series.len().max(1) as f64;
    let bar = 0.84 / n;
    let small = ("sans-serif", 8).into_font().color(&BLACK);
    for (i, series) in panel.series.iter().enumerate() {
        let fill = colour(names, &series.name);
        for g in 0..groups {
            let left = g as f64 - 0.42 + bar * i as f64;
            let centre = left + bar / 2.0;
            match series.values.get(g).copied().flatten() {
                Some(v) => {
                    chart
                        .draw_series(std::iter::once(Rectangle::new(
                            [(left, 0.0), (left + bar * 0.92, v.min(top))],
                            fill.filled(),
                        )))
                        .map_err(err)?;
                    chart
                        .draw_series(std::iter::once(Text::new(
                            fmt_bar(v),
                            (centre, v.min(top)),
                            small.pos(Pos::new(HPos::Center, VPos::Bottom)),
                        )))
                        .map_err(err)?;
                }
                None => {
                    chart
                        .draw_series(std::iter::once(Text::new(
                            "n/a",
                            (centre, 0.0),
                            small.pos(Pos::new(HPos::Center, VPos::Bottom)),
                        )))
                        .map_err(err)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axis_maxima() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(10.0), 10.0);
        assert_eq!(nice_max(11.0), 20.0);
        assert_eq!(nice_max(43_000.0), 50_000.0);
        assert_eq!(nice_max(0.3), 0.5);
    }

    /// The `height` of every `<rect>` filled with `colour` (upper-case hex, as plotters writes).
    fn bar_heights(svg: &str, colour: &str) -> Vec<f64> {
        svg.split("<rect")
            .skip(1)
            .filter(|r| r.contains(&format!("fill=\"{colour}\"")))
            .filter_map(|r| {
                let h = r.split("height=\"").nth(1)?.split('"').next()?;
                h.parse().ok()
            })
            .collect()
    }

    #[test]
    fn bars_are_drawn_to_scale_per_section_and_missing_values_marked() {
        let panel = |title: &str, mesh: Vec<Option<f64>>| Panel {
            title: title.into(),
            groups: vec!["c=1".into(), "c=16".into()],
            series: vec![
                Series {
                    name: "direct".into(),
                    values: vec![Some(50.0), Some(100.0)],
                },
                Series {
                    name: "mesh <tls>".into(),
                    values: mesh,
                },
            ],
        };
        let sections = [
            Section {
                title: "Same node".into(),
                panels: vec![panel("requests/s", vec![Some(25.0), None])],
            },
            Section {
                title: "Across nodes".into(),
                panels: vec![panel("requests/s", vec![Some(100.0), Some(100.0)])],
            },
        ];
        let out = svg("t", "s", &sections, 2).unwrap();
        assert!(out.starts_with("<svg") && out.trim_end().ends_with("</svg>"));
        assert!(out.contains("mesh &lt;tls&gt;"), "text is escaped");
        assert!(out.contains("Same node") && out.contains("Across nodes"));
        // direct: 50 and 100 in both sections, on one axis scale per panel (top 100).
        let direct = bar_heights(&out, "#999999");
        let mesh = bar_heights(&out, "#E69F00");
        // Legend swatches are 12 high and come first.
        assert_eq!(direct.len(), 1 + 4, "{out}");
        assert_eq!(mesh.len(), 1 + 3, "one bar missing: {out}");
        let full = direct[2];
        assert!(full > 100.0, "{direct:?}");
        assert!((direct[1] * 2.0 - full).abs() <= 2.0, "{direct:?}");
        assert!((mesh[1] * 4.0 - full).abs() <= 4.0, "{mesh:?}");
        assert!((mesh[2] - full).abs() <= 1.0, "{mesh:?}");
        // plotters writes text content on a line of its own.
        assert_eq!(out.matches("\nn/a\n").count(), 1);
    }
}
