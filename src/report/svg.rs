//! The refinement's trials as an SVG scatter plot (refusals against KL),
//! written beside the report: users look at a frontier rather than read it.

use crate::direction::SearchResult;
use std::fmt::Write as _;

const W: f64 = 640.0;
const H: f64 = 420.0;
const MARGIN: f64 = 56.0;

/// The plot, or None when the search ran no trials.
pub fn front_svg(result: &SearchResult) -> Option<String> {
    let measured: Vec<(f64, f64, usize)> = result
        .trials
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.refusal_rate.map(|r| (t.kl, r, i)))
        .collect();
    if measured.is_empty() {
        return None;
    }
    let kl_max = measured
        .iter()
        .map(|p| p.0)
        .fold(result.kl_threshold, f64::max)
        * 1.1;
    let x = |kl: f64| MARGIN + (W - 2.0 * MARGIN) * kl / kl_max;
    let y = |r: f64| H - MARGIN - (H - 2.0 * MARGIN) * r;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    // Axes, ticks and labels.
    let (x0, y0, x1, y1) = (x(0.0), y(0.0), x(kl_max), y(1.0));
    let _ = writeln!(
        s,
        r#"<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0}" stroke="black" fill="none"/>"#
    );
    for i in 0..=5 {
        let r = i as f64 / 5.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{:.0}%</text>"#,
            x0 - 6.0,
            y(r) + 4.0,
            100.0 * r
        );
        let kl = kl_max * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{kl:.2}</text>"#,
            x(kl),
            y0 + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">first-token KL on answered harmless prompts</text>"#,
        (x0 + x1) / 2.0,
        H - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">harmful replies refused</text>"#,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
    // The KL target.
    let xt = x(result.kl_threshold);
    let _ = writeln!(
        s,
        r#"<line x1="{xt}" y1="{y0}" x2="{xt}" y2="{y1}" stroke="gray" stroke-dasharray="4 4"/><text x="{}" y="{}" fill="gray">KL target {}</text>"#,
        xt + 4.0,
        y1 + 12.0,
        result.kl_threshold
    );
    // Every trial, the front as a line with its pick numbers, the chosen point.
    for &(kl, r, _) in &measured {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#bbb"/>"##,
            x(kl),
            y(r)
        );
    }
    let path: Vec<String> = result
        .front
        .iter()
        .map(|f| {
            let t = &result.trials[f.trial];
            format!("{:.1},{:.1}", x(t.kl), y(t.refusal_rate.unwrap_or(1.0)))
        })
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" stroke="#1f77b4" fill="none" stroke-width="2"/>"##,
        path.join(" ")
    );
    for (n, f) in result.front.iter().enumerate() {
        let t = &result.trials[f.trial];
        let (cx, cy) = (x(t.kl), y(t.refusal_rate.unwrap_or(1.0)));
        let chosen = t.point == result.point;
        let _ = writeln!(
            s,
            r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="{}" fill="{}"/><text x="{:.1}" y="{:.1}">{n}{}</text>"##,
            if chosen { 6 } else { 4 },
            if chosen { "#d62728" } else { "#1f77b4" },
            cx + 7.0,
            cy - 6.0,
            if chosen { " (chosen)" } else { "" }
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}
