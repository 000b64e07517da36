"""Multilabel tasks read one 0/1 column per label from tables."""

import numpy as np
import pandas as pd

from polytask.cli.main import main


def write(tmp_path, target: str) -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4))
    frame = pd.DataFrame(x, columns=list("abcd"))
    frame["l1"], frame["l2"], frame["l3"] = (x[:, 0] > 0) * 1, (x[:, 1] > 0) * 1.0, (x[:, 2] > 0) * 1
    frame.loc[5, "l2"] = np.nan
    frame.to_csv(tmp_path / "d.csv", index=False)
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{files: {{train: {tmp_path / 'd.csv'}}}}}\n"
                      f"tasks:\n  labels: {{kind: multilabel, target: {target}, allow_missing: true}}\n"
                      "train: {epochs: 8}\nrun: {progress: false}\noptim: {lr: 0.01}\n")
    return str(config)


def test_multilabel_columns_train_and_predict(tmp_path, capsys):
    assert main(["train", write(tmp_path, "[l1, l2, l3]")]) == 0
    out = capsys.readouterr().out
    auroc = float(next(line.split()[2] for line in out.splitlines() if line.startswith("labels") and "auroc" in line))
    assert auroc > 0.85
    assert main(["predict", str(tmp_path / "run"), "--input", str(tmp_path / "d.csv")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "id,labels_l1,labels_l1_probability,labels_l2,labels_l2_probability,labels_l3,labels_l3_probability"


def test_multilabel_needs_a_list_of_columns(tmp_path, capsys):
    assert main(["train", write(tmp_path, "l1")]) == 2
    assert "list of columns" in capsys.readouterr().err
