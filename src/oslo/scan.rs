//! A structural scanner for the top level of a JSON object.
//!
//! oslo.messaging bodies are mostly values we never read (`args`, twenty `_context_*`
//! keys). serde would tokenize and validate all of them; this walks the top-level members
//! only and skips each value by its structure (strings by memchr to the closing quote,
//! containers by depth). It does not validate skipped values: it only needs to find
//! where they end. Malformed input gives None, never a panic.

use std::borrow::Cow;

/// Calls `f(key, raw_value)` for each top-level member of the object in `json`.
/// `key` is unescaped; `raw_value` is the value's JSON text. None if `json` is not an object.
pub fn members<'a>(json: &'a str, mut f: impl FnMut(Cow<'a, str>, &'a str)) -> Option<()> {
    let b = json.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return (skip_ws(b, i + 1) == b.len()).then_some(());
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(b, i)?;
        let key = super::unescape(&json[i..key_end])?;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let end = value_end(b, start)?;
        f(key, &json[start..end]);
        i = skip_ws(b, end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return (skip_ws(b, i + 1) == b.len()).then_some(()),
            _ => return None,
        }
    }
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
