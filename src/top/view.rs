//! Drawing a [`Snapshot`]: on a ratatui frame ([`render`]) or as plain text ([`plain`]). Both are
//! pure functions of the snapshot.

use ratatui::layout::{Alignment, Constraint, Layout};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row as TableRow, Table};
use ratatui::Frame;

use super::{Row, Snapshot, Status};

/// The columns: title, width on screen.
const COLUMNS: [(&str, u16); 11] = [
    ("COMPONENT", 0), // as wide as the longest name
    ("KIND", 10),
    ("IN", 11),
    ("IN/S", 8),
    ("OUT", 11),
    ("OUT/S", 8),
    ("ERRORS", 7),
    ("DEAD LETTERS", 12),
    ("LATE", 8),
    ("WM LAG", 8),
    ("CONSUMER LAG", 12),
];

/// A count (counters are whole numbers).
fn count(x: f64) -> String {
    format!("{x:.0}")
}

/// Events per second.
fn per_second(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(x) if x < 1e3 => format!("{x:.1}"),
        Some(x) if x < 1e6 => format!("{:.1}k", x / 1e3),
        Some(x) => format!("{:.2}M", x / 1e6),
    }
}

/// A duration in seconds: `1.5s`, `3m07s`, `2h05m`.
fn seconds(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(s) if s.is_nan() => "-".into(),
        Some(s) if s.abs() < 60.0 => format!("{s:.1}s"),
        Some(s) if s.abs() < 3600.0 => format!("{}m{:02}s", (s / 60.0) as i64, (s % 60.0).abs() as i64),
        Some(s) => format!("{}h{:02}m", (s / 3600.0) as i64, ((s % 3600.0) / 60.0).abs() as i64),
    }
}

/// The cells of a row, in [`COLUMNS`] order.
fn cells(r: &Row) -> [String; 11] {
    [
        r.component.clone(),
        r.kind.clone(),
        count(r.events_in),
        per_second(r.in_rate),
        count(r.events_out),
        per_second(r.out_rate),
        count(r.errors),
        count(r.dead_letters),
        count(r.late_events),
        seconds(r.watermark_lag),
        r.consumer_lag.map(count).unwrap_or_else(|| "-".into()),
    ]
}

/// The status of the last poll, in words (`live`: on screen, where polls go on).
fn status(s: &Status, live: bool) -> String {
    match s {
        Status::Starting => "connecting...".into(),
        Status::Ok => "ok".into(),
        Status::Unreachable { error, last_ok } => format!(
            "UNREACHABLE ({}{}): {error}",
            match last_ok {
                Some(d) => format!("last answer {}s ago", d.as_secs()),
                None => "no answer yet".into(),
            },
            if live { ", retrying every second" } else { "" }
        ),
    }
}

fn checkpoint(s: &Snapshot) -> String {
    match (s.checkpoint_epoch, s.checkpoint_age) {
        (None, None) => "checkpoint: -".into(),
        (epoch, age) => {
            format!("checkpoint: epoch {}, age {}", epoch.map(count).unwrap_or_else(|| "-".into()), seconds(age))
        }
    }
}

/// Draws the snapshot over the whole frame: two header lines, the table, a key hint.
pub fn render(frame: &mut Frame, s: &Snapshot) {
    let [head, body, foot] =
        Layout::vertical([Constraint::Length(2), Constraint::Min(1), Constraint::Length(1)]).areas(frame.area());
    let status_style = match s.status {
        Status::Ok => Style::new().fg(Color::Green),
        Status::Starting => Style::new().fg(Color::Yellow),
        Status::Unreachable { .. } => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
    };
    let header = vec![
        Line::from(vec![
            Span::from("centralflow top ").bold(),
            Span::from(s.address.as_str()),
            Span::from("  "),
            Span::styled(status(&s.status, true), status_style),
        ]),
        Line::from(format!("{}   components: {}", checkpoint(s), s.rows.len())),
    ];
    frame.render_widget(Paragraph::new(header), head);

    // as many columns as fit, from the left; the component's name whole
    let names = s.rows.iter().map(|r| r.component.chars().count()).max().unwrap_or(0).clamp(9, 40) as u16;
    let mut widths = vec![names];
    for (_, w) in &COLUMNS[1..] {
        if widths.iter().map(|w| w + 1).sum::<u16>() + w > body.width {
            break;
        }
        widths.push(*w);
    }
    let shown = widths.len();
    let right = |i: usize, text: String| {
        let line = Line::from(text);
        Cell::from(if i >= 2 { line.alignment(Alignment::Right) } else { line })
    };
    let titles = TableRow::new(COLUMNS.iter().take(shown).enumerate().map(|(i, (t, _))| right(i, t.to_string())))
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    // the last rows stay on screen, dimmed, while the instance does not answer
    let row_style = if s.status == Status::Ok { Style::new() } else { Style::new().fg(Color::DarkGray) };
    let rows = s.rows.iter().map(|r| {
        TableRow::new(cells(r).into_iter().take(shown).enumerate().map(|(i, c)| right(i, c))).style(row_style)
    });
    let table = Table::new(rows, widths.into_iter().map(Constraint::Length)).header(titles).column_spacing(1);
    frame.render_widget(table, body);
    let hint = match COLUMNS.len() - shown {
        0 => "q quit".to_string(),
        n => format!("q quit   ({n} more column{} in a wider terminal)", if n == 1 { "" } else { "s" }),
    };
    frame.render_widget(Paragraph::new(hint).dim(), foot);
}

/// The snapshot as plain text (`--once`): the header lines, then the table in aligned columns.
pub fn plain(s: &Snapshot) -> String {
    let mut out = format!("centralflow top {} {}\n{}\n", s.address, status(&s.status, false), checkpoint(s));
    let mut table: Vec<[String; 11]> = vec![COLUMNS.map(|(t, _)| t.replace(' ', "_"))];
    table.extend(s.rows.iter().map(cells));
    let mut widths = [0usize; 11];
    for line in &table {
        for (w, c) in widths.iter_mut().zip(line) {
            *w = (*w).max(c.chars().count());
        }
    }
    for line in &table {
        let mut text = String::new();
        for (i, (c, w)) in line.iter().zip(widths).enumerate() {
            if i < 2 {
                text.push_str(&format!("{c:<w$}  "));
            } else {
                text.push_str(&format!("{c:>w$}  "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            address: "http://10.1.2.3:8686/metrics".into(),
            status: Status::Ok,
            checkpoint_age: Some(2.31),
            checkpoint_epoch: Some(17.0),
            rows: vec![
                Row {
                    component: "devices".into(),
                    kind: "simulator".into(),
                    events_out: 123456.0,
                    out_rate: Some(2000.0),
                    dead_letters: 3.0,
                    consumer_lag: Some(42.0),
                    ..Row::default()
                },
                Row {
                    component: "per_site".into(),
                    kind: "window".into(),
                    events_in: 98765.0,
                    in_rate: Some(1999.5),
                    late_events: 12.0,
                    watermark_lag: Some(125.0),
                    ..Row::default()
                },
            ],
        }
    }

    fn screen(s: &Snapshot, width: u16, height: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(width, height)).unwrap();
        t.draw(|f| render(f, s)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..height)
            .map(|y| (0..width).map(|x| buf[(x, y)].symbol().to_string()).collect::<String>().trim_end().to_string())
            .collect()
    }

    #[test]
    fn the_screen_shows_the_header_and_one_row_per_component() {
        let lines = screen(&snapshot(), 140, 8);
        assert!(lines[0].starts_with("centralflow top http://10.1.2.3:8686/metrics  ok"), "{lines:#?}");
        assert_eq!(lines[1], "checkpoint: epoch 17, age 2.3s   components: 2");
        for title in ["COMPONENT", "KIND", "IN/S", "DEAD LETTERS", "WM LAG", "CONSUMER LAG"] {
            assert!(lines[2].contains(title), "{lines:#?}");
        }
        let cols = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(cols(&lines[3]), ["devices", "simulator", "0", "-", "123456", "2.0k", "0", "3", "0", "-", "42"]);
        assert_eq!(cols(&lines[4]), ["per_site", "window", "98765", "2.0k", "0", "-", "0", "0", "12", "2m05s", "-"]);
        assert_eq!(lines[7], "q quit");
    }

    #[test]
    fn an_unreachable_instance_is_said_on_screen_with_the_last_rows() {
        let mut s = snapshot();
        s.status = Status::Unreachable { error: "connection refused".into(), last_ok: Some(Duration::from_secs(12)) };
        let lines = screen(&s, 140, 8);
        assert!(
            lines[0].contains("UNREACHABLE (last answer 12s ago, retrying every second): connection refused"),
            "{lines:#?}"
        );
        assert!(lines[3].starts_with("devices"), "the last rows stay: {lines:#?}");
        // a small terminal does not break the drawing
        let tiny = screen(&s, 20, 3);
        assert!(tiny[0].starts_with("centralflow top"));
    }

    #[test]
    fn a_narrow_terminal_shows_the_columns_that_fit() {
        let lines = screen(&snapshot(), 80, 6);
        assert!(lines[2].ends_with("ERRORS"), "{lines:#?}");
        assert!(lines[3].starts_with("devices   simulator"), "names whole: {lines:#?}");
        assert_eq!(lines[5], "q quit   (4 more columns in a wider terminal)");
    }

    #[test]
    fn plain_text_has_aligned_columns() {
        let text = plain(&snapshot());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "centralflow top http://10.1.2.3:8686/metrics ok");
        assert_eq!(lines[1], "checkpoint: epoch 17, age 2.3s");
        assert!(lines[2].starts_with("COMPONENT  KIND "), "{text}");
        assert!(lines[2].ends_with("CONSUMER_LAG"), "{text}");
        assert_eq!(lines[3].split_whitespace().nth(4), Some("123456"));
        assert_eq!(lines[3].len(), lines[2].len(), "right-aligned to the same width:\n{text}");
        assert_eq!(lines.len(), 5);
        let mut down = snapshot();
        down.status = Status::Unreachable { error: "timed out".into(), last_ok: None };
        assert!(plain(&down)
            .starts_with("centralflow top http://10.1.2.3:8686/metrics UNREACHABLE (no answer yet): timed out\n"));
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(per_second(Some(12.345)), "12.3");
        assert_eq!(per_second(Some(2_500_000.0)), "2.50M");
        assert_eq!(seconds(Some(59.94)), "59.9s");
        assert_eq!(seconds(Some(7384.0)), "2h03m");
        assert_eq!(seconds(Some(f64::NAN)), "-");
        assert_eq!(count(1e12), "1000000000000");
    }
}
