//! Text for people and for line formats: what came off the wire (exception classes, fault
//! messages, method and queue names) may hold control characters — an ESC sequence that
//! clears a terminal, retitles its window or writes its clipboard (OSC 52), a newline that
//! forges a line of Prometheus exposition. They are shown as visible escapes (`\x1b`),
//! never passed through. Also how the parsers read bytes as text (`utf8`).

use std::borrow::Cow;
use std::fmt::Write;

/// `b` as text, if it is UTF-8. What the parsers read is mostly short ASCII (AMQP names
/// and properties, ids), where `str::from_utf8`'s setup cost more than the check (callgrind:
/// ~80 instructions a property); an ASCII test word by word settles those.
pub fn utf8(b: &[u8]) -> Option<&str> {
    if b.is_ascii() {
        // SAFETY: ASCII bytes are UTF-8
        return Some(unsafe { std::str::from_utf8_unchecked(b) });
    }
    std::str::from_utf8(b).ok()
}

/// `b` as text if every byte is printable ASCII (space to `~`), the usual header value:
/// tested eight bytes a step (a byte loop was most of what keeping a value cost).
pub fn printable_ascii(b: &[u8]) -> Option<&str> {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    let (words, tail) = b.as_chunks::<8>();
    for w in words {
        let w = u64::from_le_bytes(*w);
        // with the high bits clear, adding `0x80 - k` sets a byte's high bit exactly
        // when the byte is `>= k`: every byte must be `>= 0x20` and none `>= 0x7f`
        let at_least = |k: u8| w.wrapping_add(ONES * u64::from(0x80 - k)) & HIGH;
        if w & HIGH != 0 || at_least(0x20) != HIGH || at_least(0x7f) != 0 {
            return None;
        }
    }
    if !tail.iter().all(|c| (0x20..0x7f).contains(c)) {
        return None;
    }
    // SAFETY: every byte was just checked to be printable ASCII, which is UTF-8 (`utf8`
    // would check each byte a second time)
    Some(unsafe { std::str::from_utf8_unchecked(b) })
}

fn is_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape(s: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(|c| is_control(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_control(c) && !keep(c) {
            match c as u32 {
                n @ 0..=0xff => {
                    let _ = write!(out, "\\x{n:02x}");
                }
                n => {
                    let _ = write!(out, "\\u{{{n:x}}}");
                }
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// One value on one line (a label, a table cell): every control character escaped.
pub fn printable(s: &str) -> Cow<'_, str> {
    escape(s, |_| false)
}

/// A whole text meant for a terminal: line breaks kept, every other control escaped.
pub fn printable_text(s: &str) -> Cow<'_, str> {
    escape(s, |c| c == '\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_ascii_is_space_to_tilde() {
        for n in 0..20 {
            for bad in [0u8, 0x1f, 0x7f, 0x80, 0xff, b'\t', b'\n'] {
                for at in 0..n {
                    let mut v = vec![b'a'; n];
                    v[at] = bad;
                    assert_eq!(printable_ascii(&v), None, "{v:?}");
                }
            }
            let ok: Vec<u8> = (0x20..0x7f).cycle().skip(n * 7).take(n).collect();
            assert_eq!(printable_ascii(&ok).map(str::as_bytes), Some(&ok[..]));
        }
        let all: Vec<u8> = (0x20..0x7f).collect();
        assert!(printable_ascii(&all).is_some());
    }

    #[test]
    fn bytes_read_as_text_only_when_they_are_utf8() {
        assert_eq!(utf8(b"compute.host1"), Some("compute.host1"));
        assert_eq!(utf8("Zürich".as_bytes()), Some("Zürich"));
        assert_eq!(utf8(b""), Some(""));
        assert_eq!(utf8(b"reply_\xff"), None);
        assert_eq!(utf8(&[0xe2, 0x82]), None); // a sequence cut short
    }

    #[test]
    fn escapes_are_shown_not_obeyed() {
        let clear = "NoValidHost\u{1b}[2J\u{1b}]52;c;ZXZpbA==\u{7}";
        assert_eq!(
            printable(clear),
            "NoValidHost\\x1b[2J\\x1b]52;c;ZXZpbA==\\x07"
        );
        assert_eq!(printable("a\nb\u{9b}c\u{202e}d"), "a\\x0ab\\x9bc\\u{202e}d");
        assert_eq!(
            printable_text("line 1\nline\u{1b}2\n"),
            "line 1\nline\\x1b2\n"
        );
        assert!(matches!(printable("nova-compute"), Cow::Borrowed(_)));
    }
}
