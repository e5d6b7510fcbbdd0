"""SQLAlchemy's async ORM from sync code, under a greenback portal.

Sync code that touches an AsyncSession's objects (a template that reads a
lazy-loaded relationship, a plugin hook that runs a query through the
session's sync facade) normally fails with MissingGreenlet. Under a portal it
just works: greenback's worker greenlets speak the protocol that SQLAlchemy
uses to await from sync code.

When a whole block of ORM work is sync anyway, `await session.run_sync(fn)`
is the tool SQLAlchemy provides, and it needs no portal. A portal is for sync
code you don't control, or that sits deep below async code: templates,
hooks, __repr__ methods, libraries written for the sync ORM.

Needs SQLAlchemy and aiosqlite (pip install sqlalchemy aiosqlite).
"""

from __future__ import annotations

import asyncio

from sqlalchemy import ForeignKey, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import greenback


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(ForeignKey("author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


# --- sync code, as a template engine or a plugin would run it ---------------


def render_author_page(author: Author) -> str:
    # author.books is not loaded yet: reading it is a query, on the event loop.
    titles = ", ".join(sorted(book.title for book in author.books))
    return f"{author.name}: {titles}"


def count_books_hook(session: Session) -> int:
    # A hook written for the sync ORM, handed the AsyncSession's sync facade.
    return len(session.execute(select(Book)).scalars().all())


# --- the async application ---------------------------------------------------


async def main() -> None:
    engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session:
        session.add(Author(id=1, name="Ursula", books=[Book(title="Lathe"), Book(title="Tehanu")]))
        await session.commit()

    async with sessions() as session:
        author = (await session.execute(select(Author))).scalar_one()
        await greenback.ensure_portal()  # once per task
        print(render_author_page(author))
        print("books:", count_books_hook(session.sync_session))
        # The same lazy load in a one-shot portal, from another session.
        await show_in_one_shot_portal(sessions)
    await engine.dispose()


async def show_in_one_shot_portal(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session:
        author = (await session.execute(select(Author))).scalar_one()
        page = await greenback.with_portal_run_sync(render_author_page, author)
        print("one-shot portal:", page)


if __name__ == "__main__":
    asyncio.run(main())
