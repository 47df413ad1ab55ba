"""The document workspace: indexing, deterministic search, tools as JSON, argument errors, confinement."""
from __future__ import annotations

import json
import os

import pytest

import lossmask.workspace as workspace_module
from lossmask.errors import LossmaskError
from lossmask.workspace import (
    LIST_LIMIT,
    SNIPPET_CHARS,
    TOOL_NAMES,
    TOOLS,
    Workspace,
    check_call,
    sample_workspace,
    sentences,
)

SAMPLE = Workspace(sample_workspace())
SECRET = "zebra-secret-7731"


def call(ws: Workspace, name, arguments) -> dict:
    text = ws.call(name, arguments)
    assert isinstance(text, str)
    return json.loads(text)


# ---- the shipped sample --------------------------------------------------------------------------


def test_sample_workspace_is_packaged_and_bilingual():
    root = sample_workspace()
    assert root.parent.name == "data" and root.parent.parent.name == "lossmask"
    assert len(SAMPLE.doc_ids) == 24 and SAMPLE.skipped == []
    facts = json.loads((root / "facts.json").read_text(encoding="utf-8"))
    assert sorted(facts["documents"]) == list(SAMPLE.doc_ids)
    languages = [entry["language"] for entry in facts["documents"].values()]
    assert languages.count("en") == 12 and languages.count("de") == 12
    for doc_id in SAMPLE.doc_ids:
        doc = SAMPLE.get_doc(doc_id)
        words = len(doc["text"].split())
        assert 90 <= words <= 300, (doc_id, words)
        assert doc["text"].startswith("# " + doc["title"] + "\n")
    german = "".join(SAMPLE.get_doc(d)["text"] for d in SAMPLE.doc_ids if d.startswith(("handbuch/", "rezepte/")))
    assert all(ch in german for ch in "äöüßÄÜ")


# ---- search ------------------------------------------------------------------------------------------


def test_search_ranks_the_matching_document_first_with_its_best_sentence():
    results = SAMPLE.search("hotel budget night")
    assert results[0]["doc_id"] == "handbook/travel-policy"
    assert results[0]["title"] == "Travel Policy"
    assert results[0]["snippet"] == (
        "The hotel budget is 140 euros per night, or 175 euros per night in London, Paris and Munich."
    )
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(results) == 3
    german = SAMPLE.search("Obergrenze Hotels")
    assert german[0]["doc_id"] == "handbuch/reisekosten"
    assert "120 Euro" in german[0]["snippet"]


def test_search_is_deterministic_across_instances_and_query_forms():
    text = SAMPLE.call("workspace.search", {"query": "Urlaub Resturlaub", "top_k": 5})
    again = Workspace(sample_workspace()).call("workspace.search", {"query": "Urlaub Resturlaub", "top_k": 5})
    assert text == again
    assert SAMPLE.search("URLAUB, resturlaub?!") == SAMPLE.search("urlaub resturlaub")
    assert SAMPLE.search("Urlaub")[0]["doc_id"] == "handbuch/urlaub"  # prefix match: Urlaubstage, Urlaubsantrag
    assert "Weiß" in SAMPLE.search("Weiß")[0]["snippet"]


def test_search_breaks_ties_by_doc_id_and_honours_top_k(tmp_path):
    for name in ("c", "a", "b"):
        (tmp_path / f"{name}.md").write_text("# Same\n\nThe lighthouse keeper rings the bell.\n", encoding="utf-8")
    ws = Workspace(tmp_path)
    assert [r["doc_id"] for r in ws.search("lighthouse")] == ["a", "b", "c"]
    assert [r["doc_id"] for r in ws.search("lighthouse", top_k=2)] == ["a", "b"]
    assert len({r["score"] for r in ws.search("lighthouse")}) == 1
    assert ws.search("submarine") == []


def test_snippet_is_the_best_sentence_cut_at_a_word_boundary(tmp_path):
    long = "The harbour " + " ".join(f"word{i}" for i in range(80)) + " ends here."
    (tmp_path / "port.md").write_text(f"# Port\n\nShips dock at pier four.\n\n{long}\n", encoding="utf-8")
    ws = Workspace(tmp_path)
    assert ws.search("pier")[0]["snippet"] == "Ships dock at pier four."
    cut = ws.search("harbour")[0]["snippet"]
    assert cut.endswith("…") and len(cut) <= SNIPPET_CHARS and long.startswith(cut[:-1])
    assert ws.search("port")[0]["snippet"] == "Ships dock at pier four."  # title-only match: first sentence


def test_sentences_split_at_sentence_ends_but_not_german_ordinals():
    text = "Am 3. August 1798 brannte es. Bahn in der 2. Klasse. Die BahnCard 50. Danach kam 1805. Ende!"
    assert sentences(text) == [
        "Am 3. August 1798 brannte es.",
        "Bahn in der 2. Klasse.",
        "Die BahnCard 50.",
        "Danach kam 1805.",
        "Ende!",
    ]
    assert sentences("# Heading\n- 200 g flour\n\n1. Mix it. Then bake.") == ["200 g flour", "Mix it.", "Then bake."]


# ---- get_doc and list_docs -------------------------------------------------------------------------


def test_get_doc_and_list_docs_as_python_and_as_tool_json():
    doc = SAMPLE.get_doc("recipes/oat-pancakes")
    path = sample_workspace() / "recipes" / "oat-pancakes.md"
    assert doc == {"doc_id": "recipes/oat-pancakes", "title": "Oat Pancakes",
                   "text": path.read_text(encoding="utf-8").strip()}
    assert SAMPLE.call("workspace.get_doc", {"doc_id": "recipes/oat-pancakes"}) == json.dumps(
        doc, ensure_ascii=False, sort_keys=True, separators=(",", ":")
    )
    assert SAMPLE.list_docs("recipes/") == [
        {"doc_id": "recipes/lemon-barley-soup", "title": "Lemon Barley Soup"},
        {"doc_id": "recipes/oat-pancakes", "title": "Oat Pancakes"},
    ]
    assert SAMPLE.call("workspace.list_docs", {"prefix": "rezepte/"}) == (
        '{"docs":{"rezepte/apfelkuchen":"Apfelkuchen vom Blech","rezepte/kaesespaetzle":"Käsespätzle"},"total":2}'
    )
    everything = call(SAMPLE, "workspace.list_docs", {})
    assert list(everything["docs"]) == list(SAMPLE.doc_ids) and everything["total"] == 24
    assert call(SAMPLE, "workspace.list_docs", {"prefix": "nothing/"}) == {"docs": {}, "total": 0}


def test_unknown_doc_ids_suggest_the_intended_one():
    for wrong in ("handbook/travel-policy.md", "travel-policy", "Handbook/Travel-Policy", "handbook/travel-polcy"):
        result = call(SAMPLE, "workspace.get_doc", {"doc_id": wrong})
        assert "no document with doc_id" in result["error"]
        assert result["did_you_mean"][0] == "handbook/travel-policy"
    assert "did_you_mean" not in call(SAMPLE, "workspace.get_doc", {"doc_id": "zz/qq"})


# ---- argument validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, arguments, message",
    [
        ("workspace.delete", {}, "unknown tool 'workspace.delete'; available tools: workspace.search"),
        (None, {}, "unknown tool None"),
        ("workspace.search", ["hotel"], "arguments of workspace.search must be a JSON object, got an array"),
        ("workspace.search", {}, "missing required argument 'query'"),
        ("workspace.search", {"query": "x", "limit": 3}, "unknown argument 'limit' for workspace.search"),
        ("workspace.get_doc", {"id": "handbook/onboarding"}, "unknown argument 'id' for workspace.get_doc; it takes: "
         "doc_id"),
        ("workspace.search", {"query": 42}, "argument 'query' of workspace.search must be a string, got a number"),
        ("workspace.search", {"query": "x", "top_k": "3"}, "'top_k' of workspace.search must be an integer, got a "
         "string"),
        ("workspace.search", {"query": "x", "top_k": True}, "must be an integer, got a boolean"),
        ("workspace.search", {"query": "x", "top_k": 2.0}, "must be an integer, got a number"),
        ("workspace.search", {"query": "x", "top_k": 0}, "must be from 1 to 10, got 0"),
        ("workspace.search", {"query": "x", "top_k": 11}, "must be from 1 to 10, got 11"),
        ("workspace.search", {"query": ""}, "argument 'query' of workspace.search must not be empty"),
        ("workspace.search", {"query": "?! ..."}, "the query has no words to search for"),
        ("workspace.search", {"query": "x" * 501}, "longer than 500 characters"),
        ("workspace.get_doc", {"doc_id": ""}, "must not be empty"),
        ("workspace.list_docs", {"prefix": 3}, "argument 'prefix' of workspace.list_docs must be a string"),
    ],
)
def test_bad_calls_come_back_as_error_results(name, arguments, message):
    result = call(SAMPLE, name, arguments)
    assert list(result) == ["error"]
    assert message in result["error"]


def test_tool_schemas_and_check_call_agree():
    assert TOOL_NAMES == ("workspace.search", "workspace.get_doc", "workspace.list_docs")
    for tool in TOOLS:
        parameters = tool["function"]["parameters"]
        assert tool["type"] == "function" and parameters["additionalProperties"] is False
        assert set(parameters["required"]) <= set(parameters["properties"])
    assert check_call("workspace.search", {"query": "hotel", "top_k": 10}) is None
    assert check_call("workspace.get_doc", {"doc_id": "a/b"}) is None
    assert check_call("workspace.list_docs", {}) is None


# ---- confinement -----------------------------------------------------------------------------------


@pytest.fixture
def confined(tmp_path):
    """A workspace next to a secret file and folder, with symlinks pointing at them and one inside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text(f"# Secret\n\nThe code is {SECRET}.\n", encoding="utf-8")
    (tmp_path / "secret.md").write_text(f"# Secret\n\nThe code is {SECRET}.\n", encoding="utf-8")
    root = tmp_path / "ws"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "plan.md").write_text("# Plan\n\nWe meet on Monday.\n", encoding="utf-8")
    os.symlink(outside / "secret.md", root / "link.md")
    os.symlink(outside, root / "linked_dir")
    os.symlink(root / "notes" / "plan.md", root / "alias.md")
    return Workspace(root)


@pytest.mark.parametrize(
    "doc_id, message",
    [
        ("../secret", "points outside the workspace"),
        ("notes/../../secret", "points outside the workspace"),
        ("..\\secret", "points outside the workspace"),
        ("notes\\..\\..\\secret", "points outside the workspace"),
        ("/etc/passwd", "is an absolute path"),
        ("C:\\Windows\\win", "is an absolute path"),
        ("\\\\server\\share", "is an absolute path"),
        ("notes\\plan", "contains '\\'"),
        ("notes/plan\x00.md", "contains a NUL byte"),
        ("link", "no document with doc_id 'link'"),
        ("linked_dir/secret", "no document with doc_id 'linked_dir/secret'"),
    ],
)
def test_ids_that_escape_the_workspace_are_refused(confined, doc_id, message):
    result = call(confined, "workspace.get_doc", {"doc_id": doc_id})
    assert message in result["error"]
    assert SECRET not in json.dumps(result)


def test_symlinks_out_of_the_root_are_never_indexed(confined):
    assert confined.doc_ids == ("alias", "notes/plan")  # a link that stays inside is an ordinary document
    assert [os.path.basename(p) for p in confined.skipped] == ["link.md"]
    assert call(confined, "workspace.search", {"query": SECRET}) == {"results": []}
    assert call(confined, "workspace.search", {"query": "secret code"}) == {"results": []}
    assert list(call(confined, "workspace.list_docs", {})["docs"]) == ["alias", "notes/plan"]
    assert "outside the workspace" in call(confined, "workspace.list_docs", {"prefix": "../"})["error"]
    assert "absolute path" in call(confined, "workspace.list_docs", {"prefix": "/"})["error"]


# ---- a user's own folder -----------------------------------------------------------------------------


def test_user_folder_with_nested_md_and_txt_documents(tmp_path):
    (tmp_path / "team" / "2024").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.md").write_text("# Hidden\n", encoding="utf-8")
    (tmp_path / ".draft.md").write_text("# Draft\n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "readme.md").write_bytes("\ufeff\n\n## Read Me \r\n\r\nThe kettle is in room 12.\r\n".encode("utf-8"))
    (tmp_path / "team" / "2024" / "retro.txt").write_text(
        "Retro notes\nWe ship on Friday. Ana owns the release.\n", encoding="utf-8"
    )
    ws = Workspace(str(tmp_path))
    assert ws.doc_ids == ("readme", "team/2024/retro")
    assert ws.list_docs() == [{"doc_id": "readme", "title": "Read Me"},
                              {"doc_id": "team/2024/retro", "title": "Retro notes"}]
    assert ws.get_doc("readme")["text"] == "## Read Me \n\nThe kettle is in room 12."  # BOM, CRLF, blank edges go
    assert ws.search("release")[0] == {"doc_id": "team/2024/retro", "title": "Retro notes",
                                       "snippet": "Ana owns the release.", "score": ws.search("release")[0]["score"]}
    assert ws.sentences("team/2024/retro") == ("We ship on Friday.", "Ana owns the release.")
    assert len(ws.list_docs()) <= LIST_LIMIT


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(LossmaskError, match="is not a directory"):
        Workspace(tmp_path / "missing")
    with pytest.raises(LossmaskError, match="holds no .md or .txt documents"):
        Workspace(tmp_path)
    (tmp_path / "a.md").write_text("# A\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A\n", encoding="utf-8")
    with pytest.raises(LossmaskError, match="both have the doc id 'a'"):
        Workspace(tmp_path)
    (tmp_path / "a.txt").unlink()
    (tmp_path / "b.md").write_bytes(b"# B\n\xff\xfe bad")
    with pytest.raises(LossmaskError, match=r"b\.md: not valid UTF-8 at byte 4"):
        Workspace(tmp_path)


def test_missing_fts5_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "a.md").write_text("# A\n", encoding="utf-8")
    monkeypatch.setattr(workspace_module, "_TOKENIZER", "no_such_tokenizer")
    with pytest.raises(LossmaskError, match="cannot build the workspace index.*FTS5"):
        Workspace(tmp_path)


def test_long_documents_are_truncated_in_tool_results(tmp_path):
    (tmp_path / "long.md").write_text("# Long\n\n" + "lorem ipsum " * 2000, encoding="utf-8")
    result = call(Workspace(tmp_path), "workspace.get_doc", {"doc_id": "long"})
    assert result["truncated"] is True and len(result["text"]) == workspace_module.MAX_TEXT_CHARS
