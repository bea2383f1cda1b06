//! BPE merges for a SentencePiece (`tokenizer.ggml.model = "llama"`) vocabulary.
//!
//! A SentencePiece BPE vocabulary has pieces and scores but no merge list. llama.cpp's
//! `llm_tokenizer_spm` starts from single characters and repeatedly joins the adjacent pair
//! whose concatenation is a piece with the highest score. A Hugging Face BPE model does the
//! same when its merge list holds every pair `(left, right)` of pieces whose concatenation is
//! a piece, ranked by that piece's score (highest first) -- the construction Hugging Face's
//! own `SentencePieceExtractor` uses. Ties between equal scores are broken by the ids of the
//! two halves; llama.cpp breaks them by position, which only differs for vocabularies with
//! duplicate scores.

use tokenizers::models::bpe::Vocab;

/// Every `(left, right)` pair of pieces whose concatenation is a piece, best score first.
pub(crate) fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (token, &score) in tokens.iter().zip(scores) {
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                ranked.push((score, l, r, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| a.1.cmp(&b.1))
            .then_with(|| a.2.cmp(&b.2))
    });
    ranked.dedup_by(|a, b| a.1 == b.1 && a.2 == b.2);
    ranked
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_by_score_of_the_result() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges_from_scores(&tokens, &scores, &vocab);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]
        );
    }
}
