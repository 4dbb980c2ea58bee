from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pandas as pd
import pytest

import histoflow as hf

HALLMARK = ("genesets", "h.all.v7.0.symbols.gmt")
GO_BP = ("genesets", "enrichr.GO_Biological_Process_2021.gmt")


# --------------------------------------------------------------------------------------------------------------------
# gene_embeddings_from_gene_sets


def test_hallmark_embedding_real_file(shared_data, caplog):
    gmt = shared_data.joinpath(*HALLMARK)
    genes = ["JUNB", "ATF3", "NFKBIA", "MKI67", "NOT_A_GENE"]
    with caplog.at_level(logging.WARNING, logger="histoflow"):
        emb = hf.pp.gene_embeddings_from_gene_sets(gmt, genes=genes)
    # 50 Hallmark sets allow at most 49 components: lowered, with a warning
    assert emb.shape == (4, 49) and "n_components=64" in caplog.text
    assert list(emb.index) == ["JUNB", "ATF3", "NFKBIA", "MKI67"] and emb.index.name == "gene"
    assert emb.dtypes.eq(np.float32).all()
    np.testing.assert_allclose(np.linalg.norm(emb.to_numpy(), axis=1), 1.0, rtol=1e-5)
    a = emb.attrs
    assert "knowledge-derived" in a["source"] and "not a gene foundation model" in a["source"]
    assert a["n_sets"] == 50 and a["n_components"] == 49 and a["missing"] == ["NOT_A_GENE"]
    assert "NOT_A_GENE" in caplog.text
    # JUNB, ATF3 and NFKBIA share the TNF-alpha/NF-kB set (and others); MKI67 is a proliferation gene
    cos = emb.to_numpy() @ emb.to_numpy().T
    assert cos[0, 1] > cos[0, 3] and cos[0, 2] > cos[0, 3]
    # same seed, same numbers; restricting `genes` does not change a gene's vector
    again = hf.pp.gene_embeddings_from_gene_sets(str(gmt), genes=["MKI67"], n_components=49)
    np.testing.assert_array_equal(again.loc["MKI67"].to_numpy(), emb.loc["MKI67"].to_numpy())


def test_go_bp_min_sets(shared_data):
    gmt = shared_data.joinpath(*GO_BP)
    full = hf.pp.gene_embeddings_from_gene_sets(gmt, n_components=16)
    strict = hf.pp.gene_embeddings_from_gene_sets(gmt, n_components=16, min_sets=20)
    assert full.shape[1] == 16 and full.attrs["n_sets"] > 6000
    assert 0 < strict.shape[0] < full.shape[0] == full.attrs["n_genes_total"]
    assert set(strict.index) <= set(full.index)


def test_known_answer_tfidf_cosines():
    # 6 genes, 4 sets; D duplicates A, so the TF-IDF matrix has rank 3 and a 3-component SVD keeps every inner product
    sets = {"A": ["g1", "g2"], "B": ["g2", "g3", "g4"], "C": ["g5", "g6"], "D": ["g1", "g2"]}
    emb = hf.pp.gene_embeddings_from_gene_sets(sets, n_components=3)
    genes = ["g1", "g2", "g3", "g4", "g5", "g6"]
    inc = np.array(
        [[1, 0, 0, 1], [1, 1, 0, 1], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]], dtype=float
    )  # genes × sets
    idf = np.log((1 + 6) / (1 + inc.sum(0))) + 1
    w = inc * idf
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    expected = w @ w.T
    e = emb.loc[genes].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(e @ e.T, expected, atol=1e-5)
    assert expected[0, 4] == 0 and expected[4, 5] == pytest.approx(1.0)


def test_gene_sets_bad_inputs(tmp_path):
    sets = {"A": ["g1", "g2"], "B": ["g2", "g3"]}
    with pytest.raises(ValueError, match="n_components"):
        hf.pp.gene_embeddings_from_gene_sets(sets, n_components=0)
    with pytest.raises(ValueError, match="min_sets"):
        hf.pp.gene_embeddings_from_gene_sets(sets, min_sets=0)
    with pytest.raises(ValueError, match="min_sets=5"):
        hf.pp.gene_embeddings_from_gene_sets(sets, min_sets=5)
    with pytest.raises(FileNotFoundError, match="no such file"):
        hf.pp.gene_embeddings_from_gene_sets(tmp_path / "missing.gmt")


# --------------------------------------------------------------------------------------------------------------------
# read_gene_embeddings


def _frame(n: int = 5, d: int = 4, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, d)), index=[f"G{i}" for i in range(n)], columns=[f"d{j}" for j in range(d)])


def test_read_tables_and_mappings(tmp_path):
    df = _frame()
    df.to_csv(tmp_path / "e.csv")
    df.to_csv(tmp_path / "e.tsv", sep="\t")
    df.rename_axis("gene").reset_index().to_parquet(tmp_path / "e.parquet")  # genes as a text column
    with open(tmp_path / "e.pkl", "wb") as f:
        pickle.dump({g: row.to_numpy() for g, row in df.iterrows()}, f)
    import torch

    torch.save({g: torch.tensor(row.to_numpy()) for g, row in df.iterrows()}, tmp_path / "e.pt")
    for name in ("e.csv", "e.tsv", "e.parquet", "e.pkl", "e.pt"):
        out = hf.pp.read_gene_embeddings(tmp_path / name)
        assert list(out.index) == list(df.index), name
        np.testing.assert_allclose(out.to_numpy(), df.to_numpy(), rtol=1e-6, err_msg=name)
        assert out.dtypes.eq(np.float32).all() and str(tmp_path) in out.attrs["source"]


def test_read_scgpt_folder(tmp_path):
    import torch

    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, "ERBB2": 3, "GRB7": 4, "KRT5": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    weight = torch.randn(6, 8)
    ln_w, ln_b = torch.rand(8) + 0.5, torch.randn(8)
    state = {
        "encoder.embedding.weight": weight,
        "encoder.enc_norm.weight": ln_w,
        "encoder.enc_norm.bias": ln_b,
        "value_encoder.linear1.weight": torch.randn(8, 1),
    }
    torch.save(state, tmp_path / "best_model.pt")
    out = hf.pp.read_gene_embeddings(tmp_path)
    assert list(out.index) == ["ERBB2", "GRB7", "KRT5"] and out.shape == (3, 8)
    expected = torch.nn.functional.layer_norm(weight[3:], (8,), ln_w, ln_b).numpy()
    np.testing.assert_allclose(out.to_numpy(), expected, rtol=1e-4, atol=1e-5)
    assert "scGPT" in out.attrs["source"]
    # a checkpoint passed as a file is not a gene table
    with pytest.raises(ValueError, match="model folder"):
        hf.pp.read_gene_embeddings(tmp_path / "best_model.pt")


def test_read_geneformer_folder_with_gene_map(tmp_path):
    from safetensors.numpy import save_file

    tokens = {"<pad>": 0, "<mask>": 1, "ENSG00000141736": 2, "ENSG00000141738": 3, "ENSG00000186081": 4}
    with open(tmp_path / "token_dictionary_gc95M.pkl", "wb") as f:
        pickle.dump(tokens, f)
    weight = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    save_file({"bert.embeddings.word_embeddings.weight": weight}, str(tmp_path / "model.safetensors"))
    out = hf.pp.read_gene_embeddings(tmp_path)
    assert list(out.index) == ["ENSG00000141736", "ENSG00000141738", "ENSG00000186081"]
    np.testing.assert_array_equal(out.to_numpy(), weight[2:])
    assert "Geneformer" in out.attrs["source"]
    names = {"ERBB2": "ENSG00000141736", "GRB7": "ENSG00000141738", "NOPE": "ENSG_NONE"}
    with open(tmp_path / "gene_name_id_dict.pkl", "wb") as f:
        pickle.dump(names, f)
    mapped = hf.pp.read_gene_embeddings(tmp_path, gene_map=tmp_path / "gene_name_id_dict.pkl")
    assert list(mapped.index) == ["ERBB2", "GRB7"]
    np.testing.assert_array_equal(mapped.loc["GRB7"].to_numpy(), weight[3])
    with pytest.raises(ValueError, match="maps no gene"):
        hf.pp.read_gene_embeddings(tmp_path, gene_map={"A": "B"})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.pp.read_gene_embeddings(tmp_path)


def test_read_bad_inputs(tmp_path):
    df = _frame()
    bad = df.copy()
    bad["note"] = "x"
    bad.to_csv(tmp_path / "text.csv")
    with pytest.raises(ValueError, match="non-numeric columns"):
        hf.pp.read_gene_embeddings(tmp_path / "text.csv")
    nan = df.copy()
    nan.iloc[1, 2] = np.nan
    nan.to_csv(tmp_path / "nan.csv")
    with pytest.raises(ValueError, match=r"NaN .*G1"):
        hf.pp.read_gene_embeddings(tmp_path / "nan.csv")
    dup = pd.concat([df, df.iloc[:1]])
    dup.to_csv(tmp_path / "dup.csv")
    with pytest.raises(ValueError, match="duplicated genes"):
        hf.pp.read_gene_embeddings(tmp_path / "dup.csv")
    with open(tmp_path / "ragged.pkl", "wb") as f:
        pickle.dump({"A": [1.0, 2.0], "B": [1.0]}, f)
    with pytest.raises(ValueError, match="different lengths"):
        hf.pp.read_gene_embeddings(tmp_path / "ragged.pkl")
    (tmp_path / "e.h5").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        hf.pp.read_gene_embeddings(tmp_path / "e.h5")
    with pytest.raises(FileNotFoundError, match="no such file"):
        hf.pp.read_gene_embeddings(tmp_path / "none.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a scGPT"):
        hf.pp.read_gene_embeddings(tmp_path / "empty_dir")
