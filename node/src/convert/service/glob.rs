//! Repository and tag patterns: `*` matches within one `/`-separated segment, `**` across
//! segments, `?` one character other than `/`; everything else matches itself.

/// Whether `text` matches `pattern`.
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matching with memo over (pattern index, text index): patterns and names are
    // short (names ≤ 255), so the table stays small and there is no exponential backtracking.
    let mut memo = vec![None; (p.len() + 1) * (t.len() + 1)];
    at(&p, &t, 0, 0, &mut memo)
}

fn at(p: &[char], t: &[char], i: usize, j: usize, memo: &mut Vec<Option<bool>>) -> bool {
    let idx = i * (t.len() + 1) + j;
    if let Some(r) = memo[idx] {
        return r;
    }
    let r = if i == p.len() {
        j == t.len()
    } else if p[i] == '*' {
        let double = p.get(i + 1) == Some(&'*');
        let next = if double { i + 2 } else { i + 1 };
        // Zero characters, or one more (not `/` for a single star) and stay.
        at(p, t, next, j, memo)
            || (j < t.len() && (double || t[j] != '/') && at(p, t, i, j + 1, memo))
    } else if j < t.len() && ((p[i] == '?' && t[j] != '/') || p[i] == t[j]) {
        at(p, t, i + 1, j + 1, memo)
    } else {
        false
    };
    memo[idx] = Some(r);
    r
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn stars_questions_and_segments() {
        assert!(matches("**", "a/b/c"));
        assert!(matches("*", "app"));
        assert!(!matches("*", "team/app"));
        assert!(matches("team/*", "team/app"));
        assert!(!matches("team/*", "team/x/app"));
        assert!(matches("team/**", "team/x/app"));
        assert!(matches("**/app", "a/b/app"));
        assert!(matches("v?.*", "v1.2"));
        assert!(!matches("v?", "v12"));
        assert!(matches("app", "app"));
        assert!(!matches("app", "apps"));
        assert!(matches("*-rc*", "1.0-rc2"));
        assert!(!matches("a?b", "a/b"));
        // No blow-up on adversarial input.
        assert!(!matches(&"*a".repeat(40), &format!("{}b", "a".repeat(200))));
    }
}
