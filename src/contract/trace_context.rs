//! Trace context a service already sent: W3C `traceparent` (an HTTP header; oslo.messaging
//! ≥ 18.3 with tracing on puts it in the RPC context as `_context_traceparent`) or
//! osprofiler's ids (HTTP `X-Trace-Info`, the RPC context's `trace_info`). Only the two ids
//! are kept: osprofiler's `hmac_key` never enters one, and its signature is not checked
//! (a tap has no key); the ids only decide where stacktap's spans hang in a trace.

use serde::Serialize;

/// Who made the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextOrigin {
    W3c,
    Osprofiler,
}

/// The trace a message belongs to and the span that sent it, as OpenTelemetry ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The sender's span: the parent of what stacktap sees it cause.
    pub parent_span_id: [u8; 8],
    pub origin: ContextOrigin,
}

impl TraceContext {
    /// A W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`); None if malformed, of a
    /// version we cannot read, or with an all-zero id (invalid by the spec).
    pub fn from_traceparent(v: &str) -> Option<TraceContext> {
        let mut parts = v.trim().split('-');
        let version = parts.next()?;
        let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
        // version 00 has exactly four parts; later versions may append more
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        hex_bytes::<1>(version)?;
        hex_bytes::<1>(flags)?;
        TraceContext::from_ids(hex_bytes(trace)?, hex_bytes(parent)?, ContextOrigin::W3c)
    }

    /// osprofiler's `base_id` (the trace) and `parent_id` (the sender's span), both UUIDs.
    /// osprofiler's own OpenTelemetry driver maps a UUID to a trace id by its 128 bits and
    /// to a span id by its low 64 bits; the same here, so the spans meet in one trace.
    pub fn from_osprofiler(base_id: &str, parent_id: &str) -> Option<TraceContext> {
        let trace = uuid_bytes(base_id)?;
        let parent = uuid_bytes(parent_id)?;
        let mut low = [0u8; 8];
        low.copy_from_slice(&parent[8..]);
        TraceContext::from_ids(trace, low, ContextOrigin::Osprofiler)
    }

    fn from_ids(
        trace_id: [u8; 16],
        parent_span_id: [u8; 8],
        origin: ContextOrigin,
    ) -> Option<TraceContext> {
        (trace_id != [0; 16] && parent_span_id != [0; 8]).then_some(TraceContext {
            trace_id,
            parent_span_id,
            origin,
        })
    }

    /// As a `traceparent` value (sampled), whatever made it: what the events and the
    /// fleet's wire carry.
    pub fn to_traceparent(&self) -> String {
        format!(
            "00-{}-{}-01",
            hex(&self.trace_id),
            hex(&self.parent_span_id)
        )
    }

    /// The wire form: the origin, then the traceparent (`osprofiler:00-…`).
    pub fn encode(&self) -> String {
        let origin = match self.origin {
            ContextOrigin::W3c => "w3c",
            ContextOrigin::Osprofiler => "osprofiler",
        };
        format!("{origin}:{}", self.to_traceparent())
    }

    pub fn decode(s: &str) -> Option<TraceContext> {
        let (origin, tp) = s.split_once(':')?;
        let origin = match origin {
            "w3c" => ContextOrigin::W3c,
            "osprofiler" => ContextOrigin::Osprofiler,
            _ => return None,
        };
        Some(TraceContext {
            origin,
            ..TraceContext::from_traceparent(tp)?
        })
    }
}

impl Serialize for TraceContext {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("TraceContext", 2)?;
        st.serialize_field("traceparent", &self.to_traceparent())?;
        st.serialize_field("origin", &self.origin)?;
        st.end()
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    push_hex(&mut s, b);
    s
}

/// Appends `b` as lower-case hex digits. Ids are rebuilt from bytes for every event, so
/// this stays off `fmt`'s per-digit machinery.
pub fn push_hex(s: &mut String, b: &[u8]) {
    // every id of every event passes here: digits written to a buffer and appended once,
    // not a char push (capacity check, UTF-8 encoding) per digit
    for part in b.chunks(16) {
        let mut buf = [0u8; 32];
        let digits = &mut buf[..2 * part.len()];
        hex_into(digits, part);
        s.push_str(std::str::from_utf8(digits).unwrap_or_default());
    }
}

/// `b` as lower-case hex digits into `out`, which holds exactly two bytes for each of `b`'s.
pub fn hex_into(out: &mut [u8], b: &[u8]) {
    // sixteen bytes a step with SSE2, then eight in integer arithmetic: five ids of
    // every call event are spelled
    #[cfg(target_arch = "x86_64")]
    let (out, b) = {
        let (blocks, rest) = b.as_chunks::<16>();
        let (block_out, rest_out) = out.split_at_mut(32 * blocks.len());
        for (o, block) in block_out.as_chunks_mut::<32>().0.iter_mut().zip(blocks) {
            // SAFETY: SSE2 is part of every x86_64 CPU
            *o = unsafe { hex_block(block) };
        }
        (rest_out, rest)
    };
    let (words, rest) = b.as_chunks::<8>();
    let (word_out, rest_out) = out.split_at_mut(16 * words.len());
    for (o, w) in word_out.as_chunks_mut::<16>().0.iter_mut().zip(words) {
        *o = hex_word(u64::from_be_bytes(*w));
    }
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, x) in rest_out.chunks_exact_mut(2).zip(rest) {
        pair[0] = DIGITS[usize::from(x >> 4)];
        pair[1] = DIGITS[usize::from(x & 15)];
    }
}

/// The 32 lower-case hex digits of sixteen bytes: each byte's two nibbles side by side,
/// then each nibble moved to its digit (`0` up, and past 9 on to `a`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn hex_block(b: &[u8; 16]) -> [u8; 32] {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi8, _mm_and_si128, _mm_cmpgt_epi8, _mm_loadu_si128, _mm_set1_epi8,
        _mm_srli_epi16, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpacklo_epi8,
    };
    // SAFETY: `b` is 16 readable bytes; the load needs no alignment
    let v = unsafe { _mm_loadu_si128(b.as_ptr().cast::<__m128i>()) };
    let low_nibble = _mm_set1_epi8(0x0f);
    let high = _mm_and_si128(_mm_srli_epi16(v, 4), low_nibble);
    let low = _mm_and_si128(v, low_nibble);
    let digits = |nibbles: __m128i| {
        let letter = _mm_cmpgt_epi8(nibbles, _mm_set1_epi8(9));
        let skip = _mm_and_si128(letter, _mm_set1_epi8((b'a' - b'0' - 10) as i8));
        _mm_add_epi8(_mm_add_epi8(nibbles, _mm_set1_epi8(b'0' as i8)), skip)
    };
    let mut out = [0u8; 32];
    let (first, second) = out.split_at_mut(16);
    // SAFETY: each half of `out` is 16 writable bytes; the store needs no alignment
    unsafe {
        _mm_storeu_si128(
            first.as_mut_ptr().cast::<__m128i>(),
            digits(_mm_unpacklo_epi8(high, low)),
        );
        _mm_storeu_si128(
            second.as_mut_ptr().cast::<__m128i>(),
            digits(_mm_unpackhi_epi8(high, low)),
        );
    }
    out
}

/// The sixteen lower-case hex digits of `w`'s eight bytes, most significant first.
fn hex_word(w: u64) -> [u8; 16] {
    const LOW_NIBBLES: u64 = u64::from_le_bytes([0x0f; 8]);
    // byte j (from the low end) of `x` moved to byte 2j of the result
    let spread = |x: u64| {
        let mut x = u128::from(x);
        x = (x | (x << 32)) & 0x0000_0000_ffff_ffff_0000_0000_ffff_ffff;
        x = (x | (x << 16)) & 0x0000_ffff_0000_ffff_0000_ffff_0000_ffff;
        (x | (x << 8)) & 0x00ff_00ff_00ff_00ff_00ff_00ff_00ff_00ff
    };
    // one nibble a byte, each byte's high nibble before its low one
    let nibbles = (spread((w >> 4) & LOW_NIBBLES) << 8) | spread(w & LOW_NIBBLES);
    const ONES: u128 = u128::from_le_bytes([1; 16]);
    // a byte holding 10..=15 reaches 16 with 6 added (no byte carries into the next)
    let letters = ((nibbles + 6 * ONES) >> 4) & ONES;
    (nibbles + u128::from(b'0') * ONES + letters * u128::from(b'a' - b'0' - 10)).to_be_bytes()
}

/// Exactly `N` bytes from `2N` hex digits (either case).
pub fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    decode_hex(s.as_bytes())
}

/// Each byte's value as a hex digit, `INVALID` for the rest; `LOWER` takes lower case only.
const HEX_DIGIT: [u8; 256] = digit_table(true);
const LOWER_HEX_DIGIT: [u8; 256] = digit_table(false);
const INVALID: u8 = 0x10;

const fn digit_table(upper_too: bool) -> [u8; 256] {
    let mut t = [INVALID; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = match c as u8 {
            d @ b'0'..=b'9' => d - b'0',
            d @ b'a'..=b'f' => d - b'a' + 10,
            d @ b'A'..=b'F' if upper_too => d - b'A' + 10,
            _ => INVALID,
        };
        c += 1;
    }
    t
}

/// Exactly `N` bytes from `2N` lower-case hex digits (ids kept as bytes must give their
/// text back exactly, and it comes back in lower case).
pub fn lower_hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    lower_hex_of(s.as_bytes())
}

fn lower_hex_of<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    if b.len() != 2 * N {
        return None;
    }
    // sixteen digits a step with SSE2, then eight in integer arithmetic: every id of
    // every message passes here
    let mut out = [0u8; N];
    #[cfg(target_arch = "x86_64")]
    let (b, blocks_out) = {
        let (blocks, rest) = b.as_chunks::<16>();
        for (o, block) in out.chunks_exact_mut(8).zip(blocks) {
            // SAFETY: SSE2 is part of every x86_64 CPU
            o.copy_from_slice(&unsafe { lower_hex_block(block) }?);
        }
        (rest, 8 * blocks.len())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let blocks_out = 0;
    let (words, rest) = b.as_chunks::<8>();
    for (o, w) in out[blocks_out..].chunks_exact_mut(4).zip(words) {
        o.copy_from_slice(&lower_hex_word(u64::from_le_bytes(*w))?);
    }
    let done = blocks_out + 4 * words.len();
    decode_into(&LOWER_HEX_DIGIT, rest, &mut out[done..]).then_some(out)
}

/// The eight bytes sixteen lower-case hex digits spell, or None if any is not one: each
/// byte is tested against both ranges at once (signed compares: a byte past 0x7f is
/// below every bound), then each pair of nibbles is joined in its 16-bit lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn lower_hex_block(digits: &[u8; 16]) -> Option<[u8; 8]> {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi8, _mm_and_si128, _mm_cmpgt_epi8, _mm_cvtsi128_si64, _mm_loadu_si128,
        _mm_movemask_epi8, _mm_or_si128, _mm_packus_epi16, _mm_set1_epi8, _mm_set1_epi16,
        _mm_slli_epi16, _mm_srli_epi16,
    };
    // SAFETY: `digits` is 16 readable bytes; the load needs no alignment
    let v = unsafe { _mm_loadu_si128(digits.as_ptr().cast::<__m128i>()) };
    let within = |first: u8, last: u8| {
        _mm_and_si128(
            _mm_cmpgt_epi8(v, _mm_set1_epi8(first as i8 - 1)),
            _mm_cmpgt_epi8(_mm_set1_epi8(last as i8 + 1), v),
        )
    };
    let letter = within(b'a', b'f');
    if _mm_movemask_epi8(_mm_or_si128(within(b'0', b'9'), letter)) != 0xffff {
        return None;
    }
    // a digit's value is its low nibble; a letter's is its low nibble plus 9
    let nibbles = _mm_add_epi8(
        _mm_and_si128(v, _mm_set1_epi8(0x0f)),
        _mm_and_si128(letter, _mm_set1_epi8(9)),
    );
    // a lane holds a pair, its first digit in the low byte: that one moves up a nibble
    let first = _mm_slli_epi16(_mm_and_si128(nibbles, _mm_set1_epi16(0x00ff)), 4);
    let pairs = _mm_or_si128(first, _mm_srli_epi16(nibbles, 8));
    let packed = _mm_packus_epi16(pairs, pairs);
    Some((_mm_cvtsi128_si64(packed) as u64).to_le_bytes())
}

/// The four bytes eight lower-case hex digits spell (`w`'s bytes in text order), or None
/// if any is not one. Each test is on all eight bytes at once: with the high bits clear,
/// adding `0x80 - k` to a byte sets its high bit exactly when the byte is `>= k`.
fn lower_hex_word(w: u64) -> Option<[u8; 4]> {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    let at_least = |k: u8| w.wrapping_add(ONES * u64::from(0x80 - k)) & HIGH;
    let digit = at_least(b'0') & !at_least(b'9' + 1);
    let letter = at_least(b'a') & !at_least(b'f' + 1);
    if w & HIGH != 0 || (digit | letter) != HIGH {
        return None;
    }
    // a digit's value is its low nibble; a letter's is its low nibble plus 9
    let nibbles = (w & (ONES * 0x0f)) + (letter >> 7) * 9;
    // each even byte takes its nibble high and the next byte's low, then the four
    // even bytes close up
    let pairs = ((nibbles << 4) | (nibbles >> 8)) & 0x00ff_00ff_00ff_00ff;
    let halves = (pairs | (pairs >> 8)) & 0x0000_ffff_0000_ffff;
    let packed = (halves | (halves >> 16)) as u32;
    Some(packed.to_le_bytes())
}

fn decode_hex<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    decode_with(&HEX_DIGIT, b)
}

fn decode_with<const N: usize>(table: &[u8; 256], b: &[u8]) -> Option<[u8; N]> {
    // on the correlator's path for every id: a table and one check at the end, not a
    // branch per digit
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    decode_into(table, b, &mut out).then_some(out)
}

/// Pairs of digits of `b` into `out`; false if any is not a digit in `table`.
fn decode_into(table: &[u8; 256], b: &[u8], out: &mut [u8]) -> bool {
    let mut seen = 0u8;
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let (hi, lo) = (table[usize::from(pair[0])], table[usize::from(pair[1])]);
        seen |= hi | lo;
        *o = (hi << 4) | (lo & 15);
    }
    seen & INVALID == 0
}

/// A hyphenated UUID (8-4-4-4-12) as its 32 digits, hyphens checked and left out.
fn uuid_digits(b: &[u8]) -> Option<[u8; 32]> {
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let mut plain = [0u8; 32];
    for (to, from) in [
        (0..8, 0),
        (8..12, 9),
        (12..16, 14),
        (16..20, 19),
        (20..32, 24),
    ] {
        let n = to.len();
        plain[to].copy_from_slice(&b[from..from + n]);
    }
    Some(plain)
}

/// 16 bytes from a hyphenated lower-case UUID.
pub fn lower_uuid_bytes(s: &str) -> Option<[u8; 16]> {
    lower_hex_of(&uuid_digits(s.as_bytes())?)
}

/// A UUID's 16 bytes, hyphenated or not (`req-` and other prefixes are the caller's to
/// strip).
pub fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    let b = s.trim().as_bytes();
    match b.len() {
        32 => decode_hex(b),
        36 => decode_hex(&uuid_digits(b)?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hex_into_spells_each_byte(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut out = vec![0u8; 2 * b.len()];
            super::hex_into(&mut out, &b);
            let want: String = b.iter().map(|x| format!("{x:02x}")).collect();
            prop_assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    use super::*;

    #[test]
    fn every_byte_is_spelled_in_every_step() {
        // all 256 values pass through the sixteen-byte step, the eight-byte one and the tail
        let all: Vec<u8> = (0..=255u8).collect();
        for len in [256, 24, 8, 3] {
            for b in all.chunks(len) {
                let mut out = vec![0u8; 2 * b.len()];
                hex_into(&mut out, b);
                let want: String = b.iter().map(|x| format!("{x:02x}")).collect();
                assert_eq!(String::from_utf8(out).unwrap(), want);
            }
        }
    }

    #[test]
    fn a_traceparent_is_read_and_written_back() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::from_traceparent(tp).unwrap();
        assert_eq!(hex(&c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&c.parent_span_id), "00f067aa0ba902b7");
        assert_eq!(c.to_traceparent(), tp);
        assert_eq!(TraceContext::decode(&c.encode()), Some(c));
    }

    #[test]
    fn malformed_or_invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::from_traceparent(bad), None, "{bad:?}");
        }
        // a later version may carry more
        assert!(
            TraceContext::from_traceparent(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz"
            )
            .is_some()
        );
    }

    #[test]
    fn osprofiler_ids_map_as_its_otlp_driver_maps_them() {
        let c = TraceContext::from_osprofiler(
            "0d7b6b5c-9f1e-4c36-8a1c-2f4e5d6c7b8a",
            "11112222-3333-4444-5555-666677778888",
        )
        .unwrap();
        assert_eq!(hex(&c.trace_id), "0d7b6b5c9f1e4c368a1c2f4e5d6c7b8a");
        assert_eq!(hex(&c.parent_span_id), "5555666677778888");
        assert_eq!(c.origin, ContextOrigin::Osprofiler);
        assert_eq!(TraceContext::from_osprofiler("not-a-uuid", "x"), None);
    }

    /// Every byte value in every position of `digits`, decoded by `lower_hex_of` (the
    /// step its length takes) and by the per-byte table.
    fn each_digit_decodes_as_the_table_does<const N: usize>(digits: &[u8]) {
        for pos in 0..digits.len() {
            for c in 0..=255u8 {
                let mut d = digits.to_vec();
                d[pos] = c;
                assert_eq!(
                    lower_hex_of::<N>(&d),
                    decode_with::<N>(&LOWER_HEX_DIGIT, &d),
                    "{d:?}"
                );
            }
        }
    }

    #[test]
    fn every_word_and_block_of_lower_hex_decodes_as_the_table_does() {
        // eight digits take the integer step, sixteen the SSE2 one (on x86_64)
        each_digit_decodes_as_the_table_does::<4>(b"0a1b2c3d");
        each_digit_decodes_as_the_table_does::<8>(b"0a1b2c3d4e5f6789");
    }

    proptest::proptest! {
        #[test]
        fn lower_hex_ids_decode_as_the_table_does(
            s in "[0-9a-fA-F\\x00-\\xff]{0,40}",
            id in "[0-9a-f]{32}",
        ) {
            for s in [s.as_str(), id.as_str()] {
                proptest::prop_assert_eq!(
                    lower_hex_bytes::<16>(s),
                    decode_with::<16>(&LOWER_HEX_DIGIT, s.as_bytes())
                );
                proptest::prop_assert_eq!(
                    lower_hex_bytes::<8>(s),
                    decode_with::<8>(&LOWER_HEX_DIGIT, s.as_bytes())
                );
                proptest::prop_assert_eq!(
                    lower_hex_bytes::<1>(s),
                    decode_with::<1>(&LOWER_HEX_DIGIT, s.as_bytes())
                );
            }
        }
    }

    #[test]
    fn every_pair_of_bytes_decodes_as_from_str_radix_does() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let pair = [a, b];
                let want = std::str::from_utf8(&pair)
                    .ok()
                    .filter(|s| s.bytes().all(|c| c.is_ascii_hexdigit()))
                    .and_then(|s| u8::from_str_radix(s, 16).ok());
                assert_eq!(decode_hex::<1>(&pair).map(|[x]| x), want, "{pair:?}");
                let lower = want.filter(|_| !pair.iter().any(u8::is_ascii_uppercase));
                assert_eq!(
                    decode_with::<1>(&LOWER_HEX_DIGIT, &pair).map(|[x]| x),
                    lower
                );
            }
        }
    }
}
