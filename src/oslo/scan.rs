//! A structural scanner for the top level of a JSON object.
//!
//! oslo.messaging bodies are mostly values we never read (`args`, twenty `_context_*`
//! keys). serde would tokenize and validate all of them; this walks the top-level members
//! only and skips each value by its structure (strings by a block-at-a-time search for
//! the closing quote, containers by depth). It does not validate skipped values: it only needs to find
//! where they end. Malformed input gives None, never a panic.

use std::borrow::Cow;

/// How one kind of text spells JSON: plain, or escaped inside a string literal.
trait Dialect {
    fn skip_ws(b: &[u8], i: usize) -> usize;
    fn at_quote(b: &[u8], i: usize) -> bool;
    fn value_end(b: &[u8], start: usize) -> Option<usize>;
    /// The key whose opening quote is at `start`: its text, and the index just past its
    /// closing quote. Keys are short and almost never escaped: the search for the end
    /// also tells whether there is anything to unescape, so the key is not read twice.
    fn key_at(text: &str, start: usize) -> Option<(Cow<'_, str>, usize)>;
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
    fn value_end(b: &[u8], start: usize) -> Option<usize> {
        value_end(b, start)
    }
    fn key_at(text: &str, start: usize) -> Option<(Cow<'_, str>, usize)> {
        let k = find2(text.as_bytes(), start + 1, b'"', b'\\')?;
        if text.as_bytes()[k] == b'"' {
            return Some((Cow::Borrowed(cut(text, start + 1, k)), k + 1));
        }
        let end = string_end(text.as_bytes(), start)?;
        Some((super::unescape(cut(text, start, end))?, end))
    }
}

// The inner message's members are most of what a replay spends in this module. Its
// dialect's steps are forced inline into the walk (here and on `inner_value_end` and
// `inner_string_end`): as calls, each member paid for four, and for returning options
// and keys through memory; inlined, a replay took 3.7 % fewer instructions.
impl Dialect for Escaped {
    #[inline(always)]
    fn skip_ws(b: &[u8], i: usize) -> usize {
        eskip_ws(b, i)
    }
    fn at_quote(b: &[u8], i: usize) -> bool {
        is_inner_quote(b, i)
    }
    fn value_end(b: &[u8], start: usize) -> Option<usize> {
        inner_value_end(b, start).map(|(end, _)| end)
    }
    #[inline(always)]
    fn key_at(text: &str, start: usize) -> Option<(Cow<'_, str>, usize)> {
        let b = text.as_bytes();
        let k = find2(b, start + 2, b'\\', b'\\')?;
        if b.get(k + 1) == Some(&b'"') {
            return Some((Cow::Borrowed(cut(text, start + 2, k)), k + 2));
        }
        let (end, _) = inner_string_end(b, start)?;
        Some((escaped_value(cut(text, start, end))?, end))
    }
}

/// Walks the members of the object spelled in `text`, in dialect `D`, which must be all
/// of `text` (whitespace aside).
fn walk<'a, D: Dialect>(text: &'a str, mut f: impl FnMut(Cow<'a, str>, &'a str)) -> Option<()> {
    let b = text.as_bytes();
    let end = walk_at::<D>(text, D::skip_ws(b, 0), |key, start| {
        let end = D::value_end(b, start)?;
        f(key, cut(text, start, end));
        Some(end)
    })?;
    (D::skip_ws(b, end) == b.len()).then_some(())
}

/// Walks the object whose `{` is at `i` and returns the index just past its `}`. For each
/// member, `value(key, start)` gets the key and where the value starts, reads or skips the
/// value, and returns the index just past it.
fn walk_at<'a, D: Dialect>(
    text: &'a str,
    mut i: usize,
    mut value: impl FnMut(Cow<'a, str>, usize) -> Option<usize>,
) -> Option<usize> {
    let b = text.as_bytes();
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = D::skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        if !D::at_quote(b, i) {
            return None;
        }
        let (key, key_end) = D::key_at(text, i)?;
        // Python's json.dumps separators (": " and ", "), which oslo.messaging's bodies
        // use, tested first: one whitespace skip a separator instead of two
        i = if b.get(key_end..key_end + 2) == Some(b": ") {
            key_end + 2
        } else {
            i = D::skip_ws(b, key_end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i + 1
        };
        let end = value(key, D::skip_ws(b, i))?;
        if b.get(end..end + 2) == Some(b", ") {
            i = D::skip_ws(b, end + 2);
            continue;
        }
        i = D::skip_ws(b, end);
        match b.get(i) {
            Some(b',') => i = D::skip_ws(b, i + 1),
            Some(b'}') => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Calls `f(key, raw_value)` for each top-level member of the object in `json`.
/// `key` is unescaped; `raw_value` is the value's JSON text. None if `json` is not an object.
pub fn members<'a>(json: &'a str, f: impl FnMut(Cow<'a, str>, &'a str)) -> Option<()> {
    walk::<Plain>(json, f)
}

/// The end of a `null`, `true` or `false` at `start` when a delimiter (or the end of the
/// text) follows it: what the byte-at-a-time search for a scalar's end would find, in
/// one comparison (oslo's `_context_*` members are mostly these three). None for anything
/// else, which the search then reads.
#[inline(always)]
fn keyword_end(b: &[u8], start: usize, delimits: impl Fn(u8) -> bool) -> Option<usize> {
    let word = b.get(start..start + 4)?;
    let len = match word {
        b"null" | b"true" => 4,
        b"fals" if b.get(start + 4) == Some(&b'e') => 5,
        _ => return None,
    };
    let end = start + len;
    b.get(end).is_none_or(|&c| delimits(c)).then_some(end)
}

/// Like `members`, but the member named `nested`, when its value is a string literal
/// holding an object (oslo.messaging's `oslo.message`: JSON inside JSON), is walked in the
/// same pass, escaped as it is: its members go to `inner` (raw values still escaped, as
/// `escaped_string` reads them, and whether the value is a string with nothing escaped
/// inside it, which the walk found out), then `outer` gets the member with the literal. One
/// pass, not a scan to the literal's end and a second through it. None (not an object we
/// read) if that literal does not hold an object, or if the member comes twice: which one
/// counts would be a guess.
pub fn members_nesting<'a>(
    json: &'a str,
    nested: &str,
    mut outer: impl FnMut(Cow<'a, str>, &'a str),
    mut inner: impl FnMut(Cow<'a, str>, &'a str, bool),
) -> Option<()> {
    let b = json.as_bytes();
    let mut seen = false;
    let end = walk_at::<Plain>(json, skip_ws(b, 0), |key, start| {
        if key == nested && b.get(start) == Some(&b'"') {
            if std::mem::replace(&mut seen, true) {
                return None;
            }
            let end = escaped_literal_end(json, start, &mut inner)?;
            outer(key, cut(json, start, end));
            return Some(end);
        }
        let end = value_end(b, start)?;
        outer(key, cut(json, start, end));
        Some(end)
    })?;
    (skip_ws(b, end) == b.len()).then_some(())
}

/// The literal at `start` (its opening quote) walked as an escaped object, its members
/// handed to `f`; the index just past its closing quote. None if it does not hold exactly
/// one object.
fn escaped_literal_end<'a>(
    text: &'a str,
    start: usize,
    f: &mut impl FnMut(Cow<'a, str>, &'a str, bool),
) -> Option<usize> {
    let b = text.as_bytes();
    let from = eskip_ws(b, start + 1);
    let end = walk_at::<Escaped>(text, from, |key, start| {
        let (end, plain) = inner_value_end(b, start)?;
        f(key, cut(text, start, end), plain);
        Some(end)
    })?;
    let end = eskip_ws(b, end);
    (b.get(end) == Some(&b'"')).then_some(end + 1)
}

/// `text[from..to]`, where each end is 0, the text's end, or next to an ASCII byte (at
/// it or just after it), as every cut of this scanner is: a quote, a backslash, a
/// bracket, a separator or a delimiter, found by a search. Such an index is a character
/// boundary (in UTF-8 no byte of a multi-byte character is ASCII), so the two boundary
/// tests of `&text[from..to]` are left out (a few cuts for every member of every
/// message: 1.6 % of a replay of RPC traffic). The bounds are still checked.
#[inline(always)]
fn cut(text: &str, from: usize, to: usize) -> &str {
    let next_to_ascii = |i: usize| {
        let b = text.as_bytes();
        i == 0 || i == b.len() || b.get(i).is_some_and(u8::is_ascii) || b[i - 1].is_ascii()
    };
    debug_assert!(next_to_ascii(from) && next_to_ascii(to), "{from}..{to}");
    let bytes = &text.as_bytes()[from..to];
    // SAFETY: `bytes` is a run of a valid UTF-8 text whose ends are character
    // boundaries (the precondition above, asserted in tests and fuzzing), so valid UTF-8
    unsafe { std::str::from_utf8_unchecked(bytes) }
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
        let k = find2(b, i, b'"', b'\\')?;
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
            let delimits = |c: u8| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r');
            if let Some(end) = keyword_end(b, start, delimits) {
                return Some(end);
            }
            let mut i = start;
            while let Some(&c) = b.get(i) {
                if delimits(c) {
                    break;
                }
                i += 1;
            }
            (i > start).then_some(i)
        }
    }
}

/// Like `members`, for an object nested in an inner message (a raw value
/// `members_nesting` handed to `inner`): still escaped, walked as such.
pub fn nested_escaped_members<'a>(
    raw: &'a str,
    f: impl FnMut(Cow<'a, str>, &'a str),
) -> Option<()> {
    walk::<Escaped>(raw, f)
}

/// An inner value handed to `members_nesting`'s `inner`, as `escaped_value` reads it; a
/// `plain` one (a string the walk saw nothing escaped in: ids, names) is its text between
/// the quotes, without a second search of it.
pub fn escaped_string(raw: &str, plain: bool) -> Option<Cow<'_, str>> {
    if plain {
        let end = raw.len().checked_sub(2).filter(|&end| end >= 2)?;
        return Some(Cow::Borrowed(cut(raw, 2, end)));
    }
    escaped_value(raw)
}

/// An inner string value handed to `members_nesting`'s `inner`, as its final text (None if it is
/// not a string). Values without inner escapes (ids, names) are borrowed as they are.
pub fn escaped_value(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix("\\\"")?.strip_suffix("\\\"")?;
    if find2(inner.as_bytes(), 0, b'\\', b'\\').is_none() {
        return Some(Cow::Borrowed(inner));
    }
    // anything the one pass does not read (unusual or broken spellings, rare) is read
    // by the two, so that both agree on every text
    match unescape_twice(inner.as_bytes()) {
        Some(text) => Some(Cow::Owned(text)),
        None => unescape_in_turn(raw).map(Cow::Owned),
    }
}

/// The outer escaping undone, then the inner: the reading `unescape_twice` must agree with.
fn unescape_in_turn(raw: &str) -> Option<String> {
    let quoted = format!("\"{raw}\"");
    let once = super::unescape(&quoted)?.into_owned();
    super::unescape(&once).map(Cow::into_owned)
}

/// The text of an inner string's content (between its `\"`s), both escapings undone in
/// one pass; None for a spelling it leaves to the two passes (an outer `\uXXXX`, an inner
/// escape's letter escaped as other than `\\` or `\"`, anything broken). A traceback in a
/// failure reply is the long text read this way: its every line break is an inner `\n`
/// spelled `\\n`, and two passes found each escape twice, through a copy of the whole
/// text between them.
fn unescape_twice(b: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(j) = memchr::memchr(b'\\', &b[i..]).map(|k| i + k) {
        out.extend_from_slice(&b[i..j]);
        i = j + 2;
        match *b.get(j + 1)? {
            // an escaped backslash: an inner escape starts
            b'\\' => i = inner_escape(b, i, &mut out)?,
            letter => out.push(super::escaped_byte(letter)?),
        }
    }
    out.extend_from_slice(&b[i..]);
    String::from_utf8(out).ok()
}

/// The inner escape whose letter starts at `b[at]` (its backslash was `\\`), decoded into
/// `out`; the index past it.
fn inner_escape(b: &[u8], at: usize, out: &mut Vec<u8>) -> Option<usize> {
    match *b.get(at)? {
        // the letter is itself escaped: a quote or a backslash
        b'\\' => match *b.get(at + 1)? {
            letter @ (b'"' | b'\\') => out.push(letter),
            _ => return None,
        },
        b'u' => return inner_unicode(b, at + 1, out),
        // a bare quote (broken outer spelling) is read as the two passes read it
        letter => out.push(super::escaped_byte(letter)?),
    }
    Some(if b[at] == b'\\' { at + 2 } else { at + 1 })
}

/// An inner `\uXXXX` (a surrogate pair joined when its second half follows as `\\uXXXX`)
/// whose digits start at `b[at]`, into `out`; the index past it.
fn inner_unicode(b: &[u8], at: usize, out: &mut Vec<u8>) -> Option<usize> {
    let hex = |k: usize| {
        let digits = std::str::from_utf8(b.get(k..k + 4)?).ok()?;
        u32::from_str_radix(digits, 16).ok()
    };
    let mut cp = hex(at)?;
    let mut end = at + 4;
    if super::high_surrogate(cp)
        && b.get(end..end + 3) == Some(b"\\\\u")
        && let Some(pair) = hex(end + 3).and_then(|lo| super::surrogate_pair(cp, lo))
    {
        cp = pair;
        end += 7;
    }
    super::push_code_point(out, cp);
    Some(end)
}

/// The first index at or after `from` where `b` holds `x` or `y`. What this module
/// searches is short (keys, ids, names: tens of bytes), where memchr's setup costs more
/// than the search itself; this tests sixteen bytes per step with SSE2 on x86_64, then
/// eight per step in plain integer code (a byte equal to `x` is a zero byte of the word
/// xor `x`). memchr's own portable searcher (`arch::all::memchr::Two`), built for long
/// haystacks, cost 10 % more instructions on the whole load replay than the integer
/// code alone; the SSE2 step took 1.8 % off that replay's instructions.
fn find2(b: &[u8], from: usize, x: u8, y: u8) -> Option<usize> {
    const LO: u64 = u64::from_le_bytes([1; 8]);
    const HI: u64 = u64::from_le_bytes([0x80; 8]);
    let zero_bytes = |w: u64| w.wrapping_sub(LO) & !w & HI;
    let (xs, ys) = (LO * u64::from(x), LO * u64::from(y));
    #[cfg(target_arch = "x86_64")]
    let mut i = {
        // SAFETY: SSE2 is part of every x86_64 CPU
        match unsafe { find2_sse2(b, from, x, y) } {
            Ok(found) => return Some(found),
            Err(blocks_end) => blocks_end,
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let mut i = from;
    while let Some(chunk) = b.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().ok()?);
        // the lowest flagged byte is exact (only bytes above a true match can be flagged
        // falsely, by the borrow), so the first match is the lowest flag of either
        let hits = zero_bytes(w ^ xs) | zero_bytes(w ^ ys);
        if hits != 0 {
            return Some(i + (hits.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let tail = b.get(i..)?;
    tail.iter().position(|&c| c == x || c == y).map(|k| i + k)
}

/// `find2` sixteen bytes per step, with SSE2 (part of every x86_64): the first match in
/// whole 16-byte blocks from `from`, or, if none holds one, where those blocks end (the
/// rest is left to the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn find2_sse2(b: &[u8], from: usize, x: u8, y: u8) -> Result<usize, usize> {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    let (xs, ys) = (_mm_set1_epi8(x as i8), _mm_set1_epi8(y as i8));
    let mut i = from;
    while let Some(block) = b.get(i..i + 16) {
        // SAFETY: `block` is 16 readable bytes; the load needs no alignment
        let v = unsafe { _mm_loadu_si128(block.as_ptr().cast::<__m128i>()) };
        let hits = _mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, xs), _mm_cmpeq_epi8(v, ys)));
        if hits != 0 {
            return Ok(i + hits.trailing_zeros() as usize);
        }
        i += 16;
    }
    Err(i)
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

/// `b[start..]` starts with an inner quote (`\"`); the index just past the closing one,
/// and whether nothing was escaped between them.
#[inline(always)]
fn inner_string_end(b: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut i = start + 2;
    loop {
        let k = find2(b, i, b'\\', b'\\')?;
        match *b.get(k + 1)? {
            b'"' => return Some((k + 2, i == start + 2)),
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

/// The index just past the inner value at `start`, and whether it is a string with
/// nothing escaped inside.
#[inline(always)]
fn inner_value_end(b: &[u8], start: usize) -> Option<(usize, bool)> {
    match *b.get(start)? {
        b'\\' if is_inner_quote(b, start) => inner_string_end(b, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match *b.get(i)? {
                    b'\\' if is_inner_quote(b, i) => {
                        i = inner_string_end(b, i)?.0;
                        continue;
                    }
                    b'\\' => i += 1, // escaped whitespace between tokens
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some((i + 1, false));
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let delimits = |c: u8| matches!(c, b',' | b'}' | b']' | b' ' | b'\\');
            if let Some(end) = keyword_end(b, start, delimits) {
                return Some((end, false));
            }
            let mut i = start;
            while let Some(&c) = b.get(i) {
                if delimits(c) {
                    break;
                }
                i += 1;
            }
            (i > start).then_some((i, false))
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

    /// Python's `json.dumps` spacing (", " and ": "), as oslo.messaging writes bodies.
    struct PythonSpacing;

    impl serde_json::ser::Formatter for PythonSpacing {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            python_comma(w, first)
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            python_comma(w, first)
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }

    /// Python's item separator, before every member or element but the first.
    fn python_comma<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    /// `v` as JSON: compact, pretty, or spaced as Python writes it.
    fn spell(v: &serde_json::Value, style: u8) -> String {
        match style % 3 {
            0 => serde_json::to_string(v).unwrap(),
            1 => serde_json::to_string_pretty(v).unwrap(),
            _ => {
                let mut out = Vec::new();
                let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonSpacing);
                serde::Serialize::serialize(v, &mut ser).unwrap();
                String::from_utf8(out).unwrap()
            }
        }
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
        /// The block-at-a-time search finds what a byte loop finds, at every offset.
        #[test]
        fn find2_agrees(b in proptest::collection::vec(prop_oneof![Just(b'"'), Just(b'\\'), Just(0x80u8), Just(0u8), Just(0xffu8), any::<u8>()], 0..40), from in 0usize..44) {
            let naive = b.get(from..).and_then(|t| t.iter().position(|&c| c == b'"' || c == b'\\')).map(|k| k + from);
            prop_assert_eq!(find2(&b, from, b'"', b'\\'), naive);
        }

        /// Every object serde_json writes (compact or pretty) scans to the same members.
        #[test]
        fn agrees_with_serde(obj in proptest::collection::btree_map("\\PC{0,8}", arb_json(), 0..8), style in any::<u8>()) {
            let v = serde_json::Value::Object(obj.clone().into_iter().collect());
            let text = spell(&v, style);
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

    /// The members of the object inside `literal`, as `members_nesting` walks them inside
    /// an envelope; the envelope sees the whole literal.
    fn escaped_members(literal: &str, f: &mut dyn FnMut(Cow<'_, str>, &str, bool)) -> Option<()> {
        let json = format!("{{\"oslo.version\": \"2.0\", \"oslo.message\": {literal}}}");
        let mut outer_saw = None;
        let keep = |k: Cow<'_, str>, raw: &str| {
            if k == "oslo.message" {
                outer_saw = Some(raw.len());
            }
        };
        members_nesting(&json, "oslo.message", keep, f)?;
        assert_eq!(outer_saw, Some(literal.len()));
        Some(())
    }

    #[test]
    fn nesting_reads_one_object_literal_only() {
        let nest = |json: &str| {
            let mut n = 0;
            members_nesting(json, "m", |_, _| {}, |_, _, _| n += 1).map(|()| n)
        };
        assert_eq!(nest(r#"{"m": "{\"a\": 1, \"b\": [2]}", "x": 3}"#), Some(2));
        assert_eq!(nest(r#"{"m": null, "x": "{}"}"#), Some(0));
        assert_eq!(nest(r#"{"m": "hello"}"#), None);
        assert_eq!(nest(r#"{"m": "{} x"}"#), None);
        assert_eq!(nest(r#"{"m": "{}", "m": "{}"}"#), None);
        assert_eq!(nest(r#"{"m": "{\n}\n" }"#), Some(0));
    }

    proptest! {
        /// Walking the escaped text finds the same members as unescaping first.
        #[test]
        fn escaped_walk_agrees(obj in proptest::collection::btree_map("\\PC{0,8}", arb_json(), 0..8), style in any::<u8>()) {
            let v = serde_json::Value::Object(obj.clone().into_iter().collect());
            let inner = spell(&v, style);
            let literal = serde_json::to_string(&inner).unwrap();
            let mut got = Vec::new();
            escaped_members(&literal, &mut |k: Cow<'_, str>, raw: &str, _| {
                // a raw escaped value is the inner JSON text escaped once
                let text = crate::oslo::unescape(&format!("\"{raw}\"")).unwrap().into_owned();
                got.push((k.into_owned(), serde_json::from_str::<serde_json::Value>(&text).unwrap()));
            }).expect("valid");
            let want: Vec<(String, serde_json::Value)> = obj.into_iter().collect();
            prop_assert_eq!(&got, &want);
            // strings come back whole through escaped_value
            escaped_members(&literal, &mut |k: Cow<'_, str>, raw: &str, plain: bool| {
                // what the walk saw of a value is what a second search sees
                assert_eq!(escaped_string(raw, plain), escaped_value(raw));
                if plain {
                    assert!(!raw[2..raw.len() - 2].contains('\\'), "{raw:?}");
                }
                if let Some(serde_json::Value::String(s)) = v.get(k.as_ref()) {
                    assert_eq!(escaped_value(raw).unwrap(), s.as_str());
                } else {
                    assert!(escaped_value(raw).is_none() || matches!(v.get(k.as_ref()), Some(serde_json::Value::String(_))));
                }
            }).unwrap();
        }

        #[test]
        fn escaped_walk_never_panics(s in "\\PC{0,80}") {
            let _ = members_nesting(&format!("{{\"m\": \"{s}\"}}"), "m", |_, _| {}, |_, raw, plain| {
                let _ = escaped_string(raw, plain);
            });
            let _ = members_nesting(&format!("{{\"m\": {}}}", serde_json::to_string(&s).unwrap()), "m", |_, _| {}, |_, raw, plain| {
                let _ = escaped_string(raw, plain);
            });
        }
    }

    proptest! {
        // the one pass reads what the two passes read, on any text: well spelled
        // (Python's way and serde's, non-ASCII escaped or not) and not
        #[test]
        fn one_pass_reads_as_two(text in "(\\PC|[\\\\\"/u0-9a-fD8n\\x00-\\x1f])*", ascii in any::<bool>()) {
            let inner = serde_json::to_string(&text).unwrap();
            let inner = if ascii {
                inner.chars().map(|c| if c.is_ascii() { c.to_string() } else {
                    let mut b = [0u16; 2];
                    c.encode_utf16(&mut b).iter().map(|u| format!("\\u{u:04x}")).collect()
                }).collect()
            } else {
                inner
            };
            let outer = serde_json::to_string(&inner).unwrap();
            let raw = &outer[1..outer.len() - 1];
            let read = escaped_value(raw).map(Cow::into_owned);
            prop_assert_eq!(read.as_deref(), Some(text.as_str()));
            prop_assert_eq!(read, unescape_in_turn(raw));
        }

        #[test]
        fn one_pass_agrees_on_garbage(content in "[\\\\\"/unt0-9a-fD8xé\\x00]{0,24}") {
            let raw = format!("\\\"{content}\\\"");
            prop_assert_eq!(escaped_value(&raw).map(Cow::into_owned), unescape_in_turn(&raw));
        }
    }

    #[test]
    fn keywords_end_where_the_search_for_a_delimiter_ends() {
        let searched = |b: &[u8], start: usize| {
            let end = (start..b.len()).find(|&i| b",}] \t\n\r".contains(&b[i]));
            end.unwrap_or(b.len())
        };
        for text in [
            "null", "null,", "null}", "true]", "true ", "false", "false,", "fals", "nul", "nullx,",
            "truex", "falsey}", "1.5,", "\"x\"",
        ] {
            let b = text.as_bytes();
            if b[0] != b'"' {
                assert_eq!(value_end(b, 0), Some(searched(b, 0)), "{text}");
            }
            if let Some(end) = keyword_end(b, 0, |c| b",}] \t\n\r".contains(&c)) {
                assert_eq!(end, searched(b, 0), "{text}");
            }
        }
        assert_eq!(keyword_end(b"nullx", 0, |c| c == b','), None);
        assert_eq!(keyword_end(b"false\\n", 0, |c| c == b'\\'), Some(5));
        assert_eq!(inner_value_end(b"true\\\"}", 0), Some((4, false)));
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
        // the separators' fast path gives up the same way as the general one
        for bad in ["{\"a\": 1, }", "{\"a\": , \"b\": 2}", "{\"a\": 1, \"b\"}"] {
            assert!(members(bad, |_, _| {}).is_none(), "{bad:?}");
        }
        let spaced = "{\"a\":  1 ,  \"b\" :  [2, 3],   \"c\": \"x\" }";
        assert_eq!(collect(spaced).map(|m| m.len()), Some(3));
    }
}
