//! The end-to-end benchmark's chart: grouped bar panels as a self-contained SVG (written by
//! hand: a few rectangles and labels need no plotting library).

use std::fmt::Write as _;

/// One bar series: a configuration's value in each group (`None`: not measured or invalid).
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

/// One panel: groups along x (e.g. connection counts), one bar per series in each group.
pub struct Panel {
    pub title: String,
    pub groups: Vec<String>,
    pub series: Vec<Series>,
}

/// Bar colours, one per series (colour-blind safe, Okabe–Ito).
const COLOURS: [&str; 8] = [
    "#999999", "#E69F00", "#0072B2", "#56B4E9", "#D55E00", "#009E73", "#CC79A7", "#F0E442",
];

const PANEL_W: f64 = 460.0;
const PANEL_H: f64 = 260.0;
const MARGIN_L: f64 = 64.0;
const MARGIN_T: f64 = 34.0;
const MARGIN_B: f64 = 30.0;
const LEGEND_H: f64 = 28.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

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

/// The SVG: `title` on top, the series legend, then `panels` in rows of `columns`.
pub fn svg(title: &str, subtitle: &str, panels: &[Panel], columns: usize) -> String {
    let columns = columns.max(1);
    let rows = panels.len().div_ceil(columns);
    let width = PANEL_W * columns as f64 + 20.0;
    let top = 44.0 + LEGEND_H;
    let height = top + PANEL_H * rows as f64 + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="18" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="34" fill="#555">{}</text>"##,
        escape(subtitle)
    );
    // Legend: the series of the first panel.
    if let Some(first) = panels.first() {
        let mut x = 10.0;
        for (i, series) in first.series.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="48" width="12" height="12" fill="{}"/><text x="{}" y="58">{}</text>"#,
                COLOURS[i % COLOURS.len()],
                x + 16.0,
                escape(&series.name)
            );
            x += 24.0 + 6.5 * series.name.len() as f64;
        }
    }
    for (k, panel) in panels.iter().enumerate() {
        let ox = 10.0 + PANEL_W * (k % columns) as f64;
        let oy = top + PANEL_H * (k / columns) as f64;
        panel_svg(&mut s, panel, ox, oy);
    }
    s.push_str("</svg>\n");
    s
}

fn panel_svg(s: &mut String, panel: &Panel, ox: f64, oy: f64) {
    let plot_w = PANEL_W - MARGIN_L - 16.0;
    let plot_h = PANEL_H - MARGIN_T - MARGIN_B;
    let x0 = ox + MARGIN_L;
    let y0 = oy + MARGIN_T;
    let max = panel
        .series
        .iter()
        .flat_map(|se| se.values.iter().flatten())
        .copied()
        .fold(0.0, f64::max);
    let top = nice_max(max);
    let _ = writeln!(
        s,
        r#"<text x="{x0}" y="{}" font-size="12" font-weight="bold">{}</text>"#,
        oy + 20.0,
        escape(&panel.title)
    );
    for t in 0..=4 {
        let v = top * t as f64 / 4.0;
        let y = y0 + plot_h - plot_h * t as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            x0 + plot_w,
            x0 - 4.0,
            y + 4.0,
            fmt_tick(v)
        );
    }
    let groups = panel.groups.len().max(1);
    let group_w = plot_w / groups as f64;
    let n = panel.series.len().max(1);
    let bar_w = (group_w - 16.0) / n as f64;
    for (g, label) in panel.groups.iter().enumerate() {
        let gx = x0 + group_w * g as f64 + 8.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            gx + (group_w - 16.0) / 2.0,
            y0 + plot_h + 16.0,
            escape(label)
        );
        for (i, series) in panel.series.iter().enumerate() {
            let bx = gx + bar_w * i as f64;
            match series.values.get(g).copied().flatten() {
                Some(v) => {
                    let h = plot_h * v / top;
                    let _ = writeln!(
                        s,
                        r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                        y0 + plot_h - h,
                        (bar_w - 2.0).max(1.0),
                        COLOURS[i % COLOURS.len()],
                        escape(&series.name),
                        fmt_bar(v)
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="middle">{}</text>"#,
                        bx + bar_w / 2.0 - 1.0,
                        y0 + plot_h - h - 2.0,
                        fmt_bar(v)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="middle">n/a</text>"#,
                        bx + bar_w / 2.0 - 1.0,
                        y0 + plot_h - 2.0
                    );
                }
            }
        }
    }
    let _ = writeln!(
        s,
        r##"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="#333"/>"##,
        y0 + plot_h,
        x0 + plot_w,
        y0 + plot_h
    );
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

    #[test]
    fn bars_are_drawn_to_scale_and_missing_values_marked() {
        let panel = Panel {
            title: "requests/s <unpinned>".into(),
            groups: vec!["c=1".into(), "c=16".into()],
            series: vec![
                Series {
                    name: "direct".into(),
                    values: vec![Some(50.0), Some(100.0)],
                },
                Series {
                    name: "mesh-ebpf".into(),
                    values: vec![Some(25.0), None],
                },
            ],
        };
        let out = svg("t", "s", &[panel], 2);
        assert!(out.starts_with("<svg") && out.trim_end().ends_with("</svg>"));
        assert!(out.contains("&lt;unpinned&gt;"), "text is escaped");
        // Three bars (axis top 100, plot height 196): 98, 196 and 49 units high.
        assert_eq!(out.matches("<rect x=").count() - 2, 3, "{out}");
        for h in ["height=\"98.0\"", "height=\"196.0\"", "height=\"49.0\""] {
            assert!(out.contains(h), "{h} in {out}");
        }
        assert_eq!(out.matches(">n/a<").count(), 1);
    }
}
