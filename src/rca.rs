//! `stacktap rca`: what broke, where, since when, for how many users, in one screen; and
//! one request's tree with the failing path and its root cause marked.

use crate::api::{RcaReport, Span, SpanKind, Tree as RequestTree};
use std::fmt::Write;

/// `30s`, `15m`, `1h`, `2d` → seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<f64> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--since {s:?}: expected a number and a unit, e.g. 30m"))?;
    let mult = match unit {
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => anyhow::bail!("--since {s:?}: unit must be s, m, h or d"),
    };
    Ok(n * mult)
}

/// GETs `path` from a running stacktap (`--from http://host:port`).
pub fn fetch(base: &str, path: &str) -> anyhow::Result<String> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut resp = ureq::get(&url)
        .call()
        .map_err(|e| anyhow::anyhow!("--from {base}: {e}"))?;
    resp.body_mut()
        .read_to_string()
        .map_err(|e| anyhow::anyhow!("--from {base}: {e}"))
}

fn clock(t: f64) -> String {
    let s = t.rem_euclid(86400.0);
    format!(
        "{:02}:{:02}:{:02}",
        (s / 3600.0) as u64,
        (s % 3600.0 / 60.0) as u64,
        (s % 60.0) as u64
    )
}

fn span_text(s: &Span) -> String {
    let who = format!(
        "{} → {}",
        s.caller.as_deref().unwrap_or("?"),
        s.handler.as_deref().unwrap_or("?")
    );
    let kind = match s.kind {
        SpanKind::Http => String::new(),
        SpanKind::Call => "call ".into(),
        SpanKind::Cast => "cast ".into(),
        SpanKind::Fanout => "fanout ".into(),
        SpanKind::Notification => "notification ".into(),
    };
    let outcome = match (&s.failure, s.status) {
        (Some(f), _) => format!(
            "{}{}",
            f.error,
            f.message
                .as_deref()
                .map(|m| format!(": {}", m.chars().take(90).collect::<String>()))
                .unwrap_or_default()
        ),
        (None, Some(c)) => c.to_string(),
        (None, None) if s.error_notification => "ERROR".into(),
        (None, None) => "ok".into(),
    };
    let took = s
        .t_end
        .filter(|_| s.kind != SpanKind::Notification)
        .map(|e| format!(" {:.1}ms", (e - s.t_start) * 1000.0))
        .unwrap_or_default();
    format!("{kind}{}  {who}  {outcome}{took}", s.operation)
}

/// The tree, children in time order; the path to the root cause marked `✗`, the root
/// cause `◀ ROOT CAUSE`, a retry that ran out and the attempts before it, masked failures
/// `(masked)`, time-inferred links `~`.
pub fn render_tree(t: &RequestTree) -> String {
    let mut out = String::new();
    let verdict = match (t.symptom.as_deref(), t.user) {
        (Some(s), _) => format!("FAILED ({s})"),
        (None, true) if !t.masked.is_empty() => "ok (failures masked by retries)".into(),
        (None, true) => "ok".into(),
        (None, false) => "internal request (not a user's)".into(),
    };
    let _ = writeln!(
        out,
        "request {}  {}  {}–{}  {} spans",
        t.request_id,
        verdict,
        clock(t.t_first),
        clock(t.t_last),
        t.spans.len()
    );
    let mut on_path = vec![false; t.spans.len()];
    if let Some(mut i) = t.root_cause {
        loop {
            on_path[i] = true;
            match t.spans[i].parent {
                Some(p) if !on_path[p] => i = p,
                _ => break,
            }
        }
    }
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); t.spans.len()];
    for (i, s) in t.spans.iter().enumerate() {
        if let Some(p) = s.parent {
            children[p].push(i);
        }
    }
    let mut w = TreeText {
        t,
        children,
        on_path,
        out,
    };
    w.walk(t.root, "", None);
    w.out
}

/// Draws a request tree, one span a line.
struct TreeText<'a> {
    t: &'a RequestTree,
    children: Vec<Vec<usize>>,
    on_path: Vec<bool>,
    out: String,
}

impl TreeText<'_> {
    /// `last`: None for the top line, else whether this is its parent's last child.
    fn walk(&mut self, i: usize, prefix: &str, last: Option<bool>) {
        let t = self.t;
        let s = &t.spans[i];
        let branch = match last {
            None => "",
            Some(true) => "└─ ",
            Some(false) => "├─ ",
        };
        let mark = if self.on_path[i] { "✗ " } else { "" };
        let link = if s.inferred { "~" } else { "" };
        let tail = if t.root_cause == Some(i) {
            "   ◀ ROOT CAUSE"
        } else if t.exhausted == Some(i) {
            "   ◀ the retry ran out: caused by what failed on the attempts before it"
        } else if t.attempts.contains(&i) {
            "   ◀ an earlier attempt's failure"
        } else if t.masked.contains(&i) {
            "   (masked: retried)"
        } else {
            ""
        };
        let _ = writeln!(
            self.out,
            "{prefix}{branch}{link}{mark}{}{tail}",
            span_text(s)
        );
        let next = match last {
            None => String::new(),
            Some(true) => format!("{prefix}   "),
            Some(false) => format!("{prefix}│  "),
        };
        let kids = self.children[i].clone();
        for (k, &c) in kids.iter().enumerate() {
            self.walk(c, &next, Some(k + 1 == kids.len()));
        }
    }
}

/// `s` as one shell word: as is when it is plainly safe, else single-quoted.
pub fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The ranking: root causes by user requests broken, with where users saw them.
/// `input` is the command-line words that name what was analysed (`--from URL`, or the
/// capture files), so that the example command is one that works as printed.
pub fn render_report(r: &RcaReport, input: &str) -> String {
    let mut out = String::new();
    if r.roots.is_empty() {
        let _ = writeln!(
            out,
            "no failing user request{}",
            if r.masked_failures > 0 {
                format!(
                    " ({} failures masked by successful retries)",
                    r.masked_failures
                )
            } else {
                String::new()
            }
        );
        return out;
    }
    let span = match (r.first, r.last) {
        (Some(a), Some(b)) => format!(" between {} and {} (packet time, UTC)", clock(a), clock(b)),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "{} user requests failed{span}; {} root cause{}; {} failure{} masked by retries",
        r.failed_requests,
        r.roots.len(),
        if r.roots.len() == 1 { "" } else { "s" },
        r.masked_failures,
        if r.masked_failures == 1 { "" } else { "s" },
    );
    let _ = writeln!(out, "\nroot causes, by user requests broken:");
    for (n, root) in r.roots.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:>3}. {:>4} × {} {} → {}",
            n + 1,
            root.requests,
            root.service.as_deref().unwrap_or("?"),
            root.operation,
            root.error.as_deref().unwrap_or("?"),
        );
        if let Some(m) = &root.message {
            let m: String = m.chars().take(110).collect();
            let _ = writeln!(out, "             \"{m}\"");
        }
        let seen: Vec<String> = root
            .seen_as
            .iter()
            .map(|(k, v)| format!("{k} ({v})"))
            .collect();
        let _ = writeln!(out, "             users saw: {}", seen.join(", "));
        let _ = writeln!(out, "             path: {}", root.path.join(" → "));
        let _ = writeln!(
            out,
            "             {}–{}, e.g. stacktap rca {input} --request-id {}",
            clock(root.first_seen),
            clock(root.last_seen),
            shell_word(&root.example_request_id)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_paste_back_as_they_were() {
        assert_eq!(shell_word("req-0a1b"), "req-0a1b");
        assert_eq!(shell_word("http://127.0.0.1:9465"), "http://127.0.0.1:9465");
        assert_eq!(shell_word("my capture.pcap"), "'my capture.pcap'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), 90.0);
        assert_eq!(parse_duration("15m").unwrap(), 900.0);
        assert_eq!(parse_duration("1h").unwrap(), 3600.0);
        assert_eq!(parse_duration("2d").unwrap(), 172800.0);
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
