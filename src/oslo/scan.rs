//! A structural scanner for the top level of a JSON object.
//!
//! oslo.messaging bodies are mostly values we never read (`args`, twenty `_context_*`
//! keys). serde would tokenize and validate all of them; this walks the top-level members
//! only and skips each value by its structure (strings by memchr to the closing quote,
//! containers by depth). It does not validate skipped values: it only needs to find
//! where they end. Malformed input gives None, never a panic.

use std::borrow::Cow;

/// How one kind of text spells JSON: plain, or escaped inside a string literal.
trait Dialect {
    fn skip_ws(b: &[u8], i: usize) -> usize;
    fn at_quote(b: &[u8], i: usize) -> bool;
    fn string_end(b: &[u8], start: usize) -> Option<usize>;
    fn value_end(b: &[u8], start: usize) -> Option<usize>;
    /// The key's text from its raw (quoted) form.
    fn key(raw: &str) -> Option<Cow<'_, str>>;
}

struct Plain;
struct Escaped;

impl Dialect for Plain {
    fn skip_ws(b: &[u8], i: usize) -> usize {
        skip_ws(b, i)
    }
    fn at_quote(b: &[u8], i: usize) -> bool {
        b.get(i) == Some(&b'"')
    }
    fn string_end(b: &[u8], start: usize) -> Option<usize> {
        string_end(b, start)
    }
    fn value_end(b: &[u8], start: usize) -> Option<usize> {
        value_end(b, start)
    }
    fn key(raw: &str) -> Option<Cow<'_, str>> {
        super::unescape(raw)
    }
}

impl Dialect for Escaped {
    fn skip_ws(b: &[u8], i: usize) -> usize {
        eskip_ws(b, i)
    }
    fn at_quote(b: &[u8], i: usize) -> bool {
        is_inner_quote(b, i)
    }
    fn string_end(b: &[u8], start: usize) -> Option<usize> {
        inner_string_end(b, start)
    }
    fn value_end(b: &[u8], start: usize) -> Option<usize> {
        inner_value_end(b, start)
    }
    fn key(raw: &str) -> Option<Cow<'_, str>> {
        escaped_value(raw)
    }
}

/// Walks the members of the object spelled in `text`, in dialect `D`.
fn walk<'a, D: Dialect>(text: &'a str, mut f: impl FnMut(Cow<'a, str>, &'a str)) -> Option<()> {
    let b = text.as_bytes();
    let mut i = D::skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = D::skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return (D::skip_ws(b, i + 1) == b.len()).then_some(());
    }
    loop {
        if !D::at_quote(b, i) {
            return None;
        }
        let key_end = D::string_end(b, i)?;
        let key = D::key(&text[i..key_end])?;
        i = D::skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = D::skip_ws(b, i + 1);
        let end = D::value_end(b, start)?;
        f(key, &text[start..end]);
        i = D::skip_ws(b, end);
        match b.get(i) {
            Some(b',') => i = D::skip_ws(b, i + 1),
            Some(b'}') => return (D::skip_ws(b, i + 1) == b.len()).then_some(()),
            _ => return None,
        }
    }
}

/// Calls `f(key, raw_value)` for each top-level member of the object in `json`.
/// `key` is unescaped; `raw_value` is the value's JSON text. None if `json` is not an object.
pub fn members<'a>(json: &'a str, f: impl FnMut(Cow<'a, str>, &'a str)) -> Option<()> {
    walk::<Plain>(json, f)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// `b[start]` is a quote; the index just past the closing quote.
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        let k = memchr::memchr2(b'"', b'\\', b.get(i..)?)? + i;
        if b[k] == b'"' {
            return Some(k + 1);
        }
        i = k + 2; // the escaped character, whatever it is
    }
}

/// The index just past the value starting at `start`.
fn value_end(b: &[u8], start: usize) -> Option<usize> {
    match *b.get(start)? {
        b'"' => string_end(b, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match *b.get(i)? {
                    b'"' => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            // a number, true, false or null: up to the next delimiter
            let mut i = start;
            while let Some(c) = b.get(i) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                i += 1;
            }
            (i > start).then_some(i)
        }
    }
}

/// Like `members`, but for an object that is itself the content of a JSON string literal
/// (oslo.messaging's `oslo.message`: JSON inside JSON). `literal` is the outer string
/// literal, quotes included. Inner quotes are `\"` in it and structure characters are never
/// escaped, so the object can be walked without unescaping it first; only the values the
/// caller keeps are unescaped (twice), by `escaped_value`.
/// `raw_value` is handed over still escaped. None if this is not an object.
pub fn escaped_members<'a>(literal: &'a str, f: impl FnMut(Cow<'a, str>, &'a str)) -> Option<()> {
    let lit = literal.strip_prefix('"')?.strip_suffix('"')?;
    walk::<Escaped>(lit, f)
}

/// Like `members`, for an object nested in an inner message (a raw value
/// `escaped_members` handed out): still escaped, walked as such.
pub fn nested_escaped_members<'a>(
    raw: &'a str,
    f: impl FnMut(Cow<'a, str>, &'a str),
) -> Option<()> {
    walk::<Escaped>(raw, f)
}

/// An inner string value handed out by `escaped_members`, as its final text (None if it is
/// not a string). Values without inner escapes (ids, names) are borrowed as they are.
pub fn escaped_value(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix("\\\"")?.strip_suffix("\\\"")?;
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    // undo the outer escaping, then the inner
    let quoted = format!("\"{raw}\"");
    let once = super::unescape(&quoted)?.into_owned();
    super::unescape(&once).map(|v| Cow::Owned(v.into_owned()))
}

fn is_inner_quote(b: &[u8], i: usize) -> bool {
    b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'"')
}

/// Whitespace of the inner object: plain, or escaped once (`\n`, `\t`, `\r`).
fn eskip_ws(b: &[u8], mut i: usize) -> usize {
    loop {
        match b.get(i) {
            Some(b' ') => i += 1,
            Some(b'\\') if matches!(b.get(i + 1), Some(b'n' | b't' | b'r')) => i += 2,
            _ => return i,
        }
    }
}

/// `b[start..]` starts with an inner quote (`\"`); the index just past the closing one.
fn inner_string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 2;
    loop {
        let k = memchr::memchr(b'\\', b.get(i..)?)? + i;
        match *b.get(k + 1)? {
            b'"' => return Some(k + 2),
            // an inner escape: an escaped backslash, then the escaped character, which is
            // itself escaped (two bytes) when it is a quote or a backslash
            b'\\' => {
                i = if b.get(k + 2) == Some(&b'\\') {
                    k + 4
                } else {
                    k + 3
                }
            }
            b'u' => i = k + 6,
            _ => i = k + 2,
        }
    }
}

fn inner_value_end(b: &[u8], start: usize) -> Option<usize> {
    match *b.get(start)? {
        b'\\' if is_inner_quote(b, start) => inner_string_end(b, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match *b.get(i)? {
                    b'\\' if is_inner_quote(b, i) => {
                        i = inner_string_end(b, i)?;
                        continue;
                    }
                    b'\\' => i += 1, // escaped whitespace between tokens
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = start;
            while let Some(c) = b.get(i) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\\') {
                    break;
                }
                i += 1;
            }
            (i > start).then_some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn collect(json: &str) -> Option<Vec<(String, serde_json::Value)>> {
        let mut out = Vec::new();
        members(json, |k, v| {
            out.push((
                k.into_owned(),
                serde_json::from_str(v).expect("raw value is JSON"),
            ))
        })?;
        Some(out)
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (-1e6f64..1e6).prop_map(|x| serde_json::Value::from((x * 8.0).round() / 8.0)),
            "\\PC{0,12}".prop_map(serde_json::Value::from),
            "[\"\\\\{}\\[\\],:a ]{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("\\PC{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Every object serde_json writes (compact or pretty) scans to the same members.
        #[test]
        fn agrees_with_serde(obj in proptest::collection::btree_map("\\PC{0,8}", arb_json(), 0..8), pretty in any::<bool>()) {
            let v = serde_json::Value::Object(obj.clone().into_iter().collect());
            let text = if pretty { serde_json::to_string_pretty(&v).unwrap() } else { serde_json::to_string(&v).unwrap() };
            let got = collect(&text).expect("valid object");
            let want: Vec<(String, serde_json::Value)> = obj.into_iter().collect();
            prop_assert_eq!(got, want);
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn never_panics(s in "\\PC{0,64}", cut in 0usize..64) {
            let _ = members(&s, |_, _| {});
            let obj = format!("{{\"a\": {s}}}");
            if let Some(prefix) = obj.get(..cut.min(obj.len())) {
                let _ = members(prefix, |_, _| {});
            }
        }
    }

    proptest! {
        /// Walking the escaped text finds the same members as unescaping first.
        #[test]
        fn escaped_walk_agrees(obj in proptest::collection::btree_map("\\PC{0,8}", arb_json(), 0..8)) {
            let v = serde_json::Value::Object(obj.clone().into_iter().collect());
            let inner = serde_json::to_string(&v).unwrap();
            let literal = serde_json::to_string(&inner).unwrap();
            let mut got = Vec::new();
            escaped_members(&literal, |k, raw| {
                // a raw escaped value is the inner JSON text escaped once
                let text = crate::oslo::unescape(&format!("\"{raw}\"")).unwrap().into_owned();
                got.push((k.into_owned(), serde_json::from_str::<serde_json::Value>(&text).unwrap()));
            }).expect("valid");
            let want: Vec<(String, serde_json::Value)> = obj.into_iter().collect();
            prop_assert_eq!(&got, &want);
            // strings come back whole through escaped_value
            escaped_members(&literal, |k, raw| {
                if let Some(serde_json::Value::String(s)) = v.get(k.as_ref()) {
                    assert_eq!(escaped_value(raw).unwrap(), s.as_str());
                } else {
                    assert!(escaped_value(raw).is_none() || matches!(v.get(k.as_ref()), Some(serde_json::Value::String(_))));
                }
            }).unwrap();
        }

        #[test]
        fn escaped_walk_never_panics(s in "\\PC{0,80}") {
            let _ = escaped_members(&format!("\"{s}\""), |_, _| {});
            let _ = escaped_members(&serde_json::to_string(&s).unwrap(), |_, _| {});
        }
    }

    #[test]
    fn rejects_non_objects() {
        for bad in [
            "",
            "[]",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1} x",
            "{\"a\":\"x}",
        ] {
            assert!(members(bad, |_, _| {}).is_none(), "{bad:?}");
        }
        assert!(members("{}", |_, _| {}).is_some());
    }
}
