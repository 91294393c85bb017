"""Experiment configs: validation, path resolution, defaults derived from the task and the method table."""

import pytest

from medfl.errors import ConfigError
from medfl.experiment import load_experiment_config
from medfl.methods import METHODS, method_spec


def write(path, text):
    path.write_text(text)
    return path


SITE = """name: {name}
task: classification
data_root: data
layout: csv
label_map: {{a: a, b: b}}
"""


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "sites").mkdir()
    write(tmp_path / "sites" / "one.yaml", SITE.format(name="one"))
    write(tmp_path / "sites" / "two.yaml", SITE.format(name="two"))
    return tmp_path


def test_paths_resolve_against_the_experiment_file(folder):
    config = load_experiment_config(write(folder / "exp.yaml", """
task: classification
sites: [sites/one.yaml, sites/two.yaml]
data: {classes: [a, b]}
output_dir: out
"""))
    assert config.sites == [folder / "sites" / "one.yaml", folder / "sites" / "two.yaml"]
    assert config.output_dir == folder / "out"
    assert [s.name for s in config.load_sites()] == ["one", "two"]
    assert config.cpa_tau == 3.0 and config.cpa_warmup_rounds == 3  # 30% of 10 rounds


def test_unknown_key_names_key_and_file(folder):
    path = write(folder / "exp.yaml", "task: classification\nsites: [sites/one.yaml]\nrounds: 2\nlocal_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml.*local_epoch.*local_epochs"):
        load_experiment_config(path)


def test_nested_unknown_key_and_bad_method(folder):
    with pytest.raises(ConfigError, match=r"det\.lamda1"):
        load_experiment_config(write(folder / "a.yaml", "task: classification\nsites: [sites/one.yaml]\n"
                                     "data: {classes: [a, b]}\ndet: {lamda1: 0.5}\n"))
    with pytest.raises(ConfigError, match="unknown method 'fedsomething'"):
        load_experiment_config(write(folder / "b.yaml", "task: classification\nsites: [sites/one.yaml]\n"
                                     "data: {classes: [a, b]}\nmethod: fedsomething\n"))


def test_det_thresholds_must_be_ordered(folder):
    with pytest.raises(ConfigError, match="lambda1"):
        load_experiment_config(write(folder / "a.yaml", "task: classification\nsites: [sites/one.yaml]\n"
                                     "data: {classes: [a, b]}\ndet: {lambda1: 0.9, lambda2: 0.8}\n"))


def test_classes_must_be_covered_by_every_site(folder):
    config = load_experiment_config(write(folder / "a.yaml", "task: classification\nsites: [sites/one.yaml]\n"
                                          "data: {classes: [a, c]}\n"))
    with pytest.raises(ConfigError, match=r"site 'one'.*does not cover class\(es\) c"):
        config.load_sites()


def test_duplicate_site_names_are_refused(folder):
    write(folder / "sites" / "copy.yaml", SITE.format(name="one"))
    config = load_experiment_config(write(folder / "a.yaml", "task: classification\n"
                                          "sites: [sites/one.yaml, sites/copy.yaml]\ndata: {classes: [a, b]}\n"))
    with pytest.raises(ConfigError, match="site 'one' appears twice"):
        config.load_sites()


def test_overrides_replace_top_level_keys(folder):
    path = write(folder / "a.yaml", "task: classification\nsites: [sites/one.yaml]\ndata: {classes: [a, b]}\n")
    config = load_experiment_config(path, method="fedavg", rounds=3, device=None)
    assert (config.method, config.rounds, config.device) == ("fedavg", 3, "auto")


def test_method_table_is_consistent():
    assert method_spec("prr").two_models and method_spec("prr").aggregation == "pfa"
    assert method_spec("prr").distillation == "det" and method_spec("prr").loss == "cpa"
    assert not method_spec("local").communicates
    assert not method_spec("fedproto").sends_weights and method_spec("fedproto").communicates
    for spec in METHODS.values():  # two models teach each other, or P is pulled towards D's received weights (Ditto)
        assert spec.two_models == (spec.distillation is not None or spec.personal_proximal)
        assert not (spec.pools_data and spec.communicates), "a pooled model has no federation to talk to"
    with pytest.raises(ValueError, match="unknown method"):
        method_spec("nope")


def test_one_site_is_loaded_without_reading_the_others(folder, monkeypatch):
    """A command that serves one site stops neither on another site's unset variable nor on its missing file."""
    monkeypatch.delenv("MEDFL_TEST_UNSET_ROOT", raising=False)
    write(folder / "sites" / "two.yaml", SITE.format(name="two").replace("data_root: data",
                                                                         "data_root: ${MEDFL_TEST_UNSET_ROOT}"))
    config = load_experiment_config(write(folder / "a.yaml", "task: classification\ndata: {classes: [a, b]}\n"
                                          "sites: [sites/gone.yaml, sites/two.yaml, sites/one.yaml]\n"))
    site = config.load_site("one")
    assert site.name == "one" and site.data_root == folder / "sites" / "data"
    with pytest.raises(ConfigError, match="environment variable 'MEDFL_TEST_UNSET_ROOT' is not set"):
        config.load_site("two")  # its own problems are its own
    with pytest.raises(ConfigError, match=r"^site 'three': its config is not among those of the 3 site configs of "
                                          r".*a\.yaml that can be read here \(1 cannot: .*gone\.yaml: config file "
                                          r"not found\)$"):
        config.load_site("three")
    with pytest.raises(ConfigError, match="config file not found"):
        config.load_sites()
    config = load_experiment_config(write(folder / "b.yaml", "task: classification\ndata: {classes: [a, b]}\n"
                                          "sites: [sites/one.yaml]\n"))
    with pytest.raises(ConfigError, match=r"^site 'two': none of the 1 site configs of .*b\.yaml is this site's$"):
        config.load_site("two")


def test_one_site_is_checked_as_every_site_is(folder):
    write(folder / "sites" / "copy.yaml", SITE.format(name="one"))
    config = load_experiment_config(write(folder / "a.yaml", "task: classification\ndata: {classes: [a, c]}\n"
                                          "sites: [sites/one.yaml, sites/two.yaml, sites/copy.yaml]\n"))
    with pytest.raises(ConfigError, match="site 'one' appears twice"):
        config.load_site("one")
    with pytest.raises(ConfigError, match=r"site 'two'.*does not cover class\(es\) c"):
        config.load_site("two")
