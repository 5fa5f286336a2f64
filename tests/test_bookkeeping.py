"""The training loop's resume/preemption bookkeeping: what is saved when, and what a stop says."""
from prdp_jax.training.loop import Bookkeeping


class FakeCheckpointer:
    directory = "/runs/x/checkpoints"

    def __init__(self):
        self.saved = []

    def save(self, epoch, state, meta):
        self.saved.append((epoch, state, meta))


def test_a_fresh_run_never_abandons_updates_and_saves_each_epoch():
    ckpt = FakeCheckpointer()
    book = Bookkeeping(ckpt, saved=None)
    assert not book.may_abandon_updates(0)     # epoch 0's start is not on disk
    book.save(1, "state1", {"m": 1})
    assert book.saved == 1 and ckpt.saved == [(1, "state1", {"m": 1})]
    assert book.may_abandon_updates(1)         # epoch 1's start (= epoch 1 done) is on disk
    assert not book.may_abandon_updates(2)


def test_a_stop_before_the_updates_saves_the_epochs_start_once():
    ckpt = FakeCheckpointer()
    book = Bookkeeping(ckpt, saved=2)
    book.save_stopped(2, "s", {})              # already on disk: nothing written
    assert ckpt.saved == []
    book.save_stopped(3, "s3", {"p": 3})       # epoch 3 done but not saved (every_epochs > 1)
    assert ckpt.saved == [(3, "s3", {"p": 3})] and book.saved == 3
    Bookkeeping(ckpt, saved=None).save_stopped(0, "s0", {})   # nothing has run: nothing to save
    assert len(ckpt.saved) == 1


def test_the_preemption_message_names_the_checkpoint_or_says_none_finished():
    book = Bookkeeping(FakeCheckpointer(), saved=None)
    assert str(book.preempted(0)) == ("stopped by SIGTERM in epoch 1; no epoch had finished; "
                                      "rerun the same command to resume")
    book.saved = 4
    assert str(book.preempted(4)) == ("stopped by SIGTERM in epoch 5; the checkpoint of epoch 4 "
                                      "is in /runs/x/checkpoints; rerun the same command to resume")
