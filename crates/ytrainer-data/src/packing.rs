//! Sample packing: whole examples side by side in rows of at most `row_len` tokens, each a segment of its own
//! (`segment_ids` 1, 2, ... in the row, positions restarting at 0), so attention never crosses from one example
//! into another and every token's loss is the one it has alone in a row (HF's `position_ids` packing, not
//! the cross-contaminating concatenation). No example is split: one longer than `row_len` keeps a row to
//! itself.

use std::collections::BTreeMap;

use crate::tokenize::Example;

/// Packs `examples` best-fit decreasing (longest first, each into the row it fills most tightly); a pure
/// function of the examples and `row_len`. Returns the rows and, for each row, the indices of the examples
/// it holds (in row order).
pub fn pack_examples(examples: &[Example], row_len: usize) -> (Vec<Example>, Vec<Vec<usize>>) {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(examples[i].len()), i));
    let mut members: Vec<Vec<usize>> = Vec::new();
    let mut used: Vec<usize> = Vec::new();
    // Rows by free space: (free, row).
    let mut free: BTreeMap<(usize, usize), ()> = BTreeMap::new();
    for i in order {
        let len = examples[i].len();
        let fit = free.range((len, 0)..).next().map(|(&k, _)| k);
        match fit {
            Some((f, row)) => {
                free.remove(&(f, row));
                members[row].push(i);
                used[row] += len;
                if used[row] < row_len {
                    free.insert((row_len - used[row], row), ());
                }
            }
            None => {
                let row = members.len();
                members.push(vec![i]);
                used.push(len);
                if len < row_len {
                    free.insert((row_len - len, row), ());
                }
            }
        }
    }
    let rows = members.iter().map(|m| concat(examples, m)).collect();
    (rows, members)
}

/// One row of `members`, each example's segments renumbered after the previous example's.
fn concat(examples: &[Example], members: &[usize]) -> Example {
    let n: usize = members.iter().map(|&i| examples[i].len()).sum();
    let mut row = Example {
        input_ids: Vec::with_capacity(n),
        targets: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
        segment_ids: Vec::with_capacity(n),
        origin: examples[members[0]].origin.clone(),
        weights: Default::default(),
    };
    // Data weights travel with their tokens (empty = all 1, kept empty when no member has any).
    if members.iter().any(|&i| !examples[i].weights.0.is_empty()) {
        row.weights.0 = members
            .iter()
            .flat_map(|&i| (0..examples[i].len()).map(move |t| examples[i].weights.get(t)))
            .collect();
    }
    let mut base = 0;
    for &i in members {
        let ex = &examples[i];
        row.input_ids.extend_from_slice(&ex.input_ids);
        // The first token of a segment is predicted from nothing in its segment: never a target (it never is
        // alone in a row either).
        row.targets.extend(
            ex.targets
                .iter()
                .enumerate()
                .map(|(t, &x)| x && t > 0 && ex.segment_ids[t] == ex.segment_ids[t - 1]),
        );
        row.position_ids.extend_from_slice(&ex.position_ids);
        let top = ex.segment_ids.iter().copied().max().unwrap_or(0);
        row.segment_ids.extend(
            ex.segment_ids
                .iter()
                .map(|&s| if s == 0 { 0 } else { s + base }),
        );
        base += top;
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize, first: u32) -> Example {
        Example::single(
            (first..first + len as u32).collect(),
            (0..len).map(|t| t >= len / 2).collect(),
            None,
        )
    }

    /// Best-fit decreasing on lengths 6, 5, 4, 3, 2 into rows of 8: 6+2, 5+3, 4; segments renumbered per row,
    /// positions restarting, a segment's first token never a target.
    #[test]
    fn packs_whole_examples_best_fit_with_restarting_positions() {
        let examples = vec![ex(3, 100), ex(6, 200), ex(2, 300), ex(5, 400), ex(4, 500)];
        let (rows, members) = pack_examples(&examples, 8);
        assert_eq!(members, [vec![1, 2], vec![3, 0], vec![4]]);
        let r = &rows[0];
        assert_eq!(r.input_ids, [200, 201, 202, 203, 204, 205, 300, 301]);
        assert_eq!(r.position_ids, [0, 1, 2, 3, 4, 5, 0, 1]);
        assert_eq!(r.segment_ids, [1, 1, 1, 1, 1, 1, 2, 2]);
        assert_eq!(
            r.targets,
            [false, false, false, true, true, true, false, true]
        );
        assert_eq!(rows[1].segment_ids, [1, 1, 1, 1, 1, 2, 2, 2]);
        assert_eq!(rows[2].len(), 4);
        // Every supervised token survives: ex(2) had targets at 1, the others from len/2 on.
        let total: usize = examples.iter().map(Example::num_targets).sum();
        assert_eq!(rows.iter().map(Example::num_targets).sum::<usize>(), total);
        // An example longer than the row keeps a row to itself.
        let (rows, members) = pack_examples(&[ex(10, 0), ex(2, 50)], 8);
        assert_eq!(members, [vec![0], vec![1]]);
        assert_eq!(rows[0].len(), 10);
    }

    /// Data weights (issue 20 item 2) travel with their tokens into the packed row; rows of unweighted examples
    /// stay unweighted.
    #[test]
    fn data_weights_follow_their_tokens() {
        let mut a = ex(3, 100);
        a.weights = crate::weights::Weights(vec![0.5, 0.5, 0.5]);
        let (rows, members) = pack_examples(&[a, ex(6, 200)], 9);
        assert_eq!(members, [vec![1, 0]]);
        assert_eq!(
            rows[0].weights.0,
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
        );
        let (rows, _) = pack_examples(&[ex(3, 100), ex(6, 200)], 9);
        assert!(rows[0].weights.0.is_empty());
    }
}
